"""SDPO (stepwise dense reward differences, for few-step models) for Stable Diffusion 1.x/2.x.

    python examples/mm/stable_diffusion/train_sd_sdpo.py --config-path=conf --config-name=sdpo_sd \
        model.pretrained=/models/sd15 model.data.train.dataset_path=prompts.txt rm.model.restore_from_path=/models/pickscore

Other configs for this method: conf/sdpo_*.yaml (the *_tiny one runs on CPU in seconds).
"""
import sys

from nemo_aligner_draft.cli.train import main

if __name__ == "__main__":
    sys.exit(main(default_config="sdpo_sd"))
