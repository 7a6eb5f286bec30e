"""GRPO (group-relative policy optimisation, Flow-GRPO's objective) for Stable Diffusion 1.x/2.x on the
stochastic DDIM sampler.

    python examples/mm/stable_diffusion/train_sd_grpo.py --config-path=conf --config-name=grpo_sd \
        model.pretrained=/models/sd15 model.data.train.dataset_path=prompts.txt rm.model.restore_from_path=/models/pickscore

Other configs for this method: conf/grpo_*.yaml (the *_tiny ones run on CPU in seconds).
"""
import sys

from nemo_aligner_draft.cli.train import main

if __name__ == "__main__":
    sys.exit(main(default_config="grpo_sd"))
