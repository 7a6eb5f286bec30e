"""DDPO (PPO-clip on the denoising chain; any reward, differentiable or not) for Stable Diffusion 1.x/2.x.

    python examples/mm/stable_diffusion/train_sd_ddpo.py --config-path=conf --config-name=ddpo_sd \
        model.pretrained=/models/sd15 model.data.train.dataset_path=prompts.txt 

Other configs for this method: conf/ddpo_*.yaml (the *_tiny one runs on CPU in seconds).
"""
import sys

from nemo_aligner_draft.cli.train import main

if __name__ == "__main__":
    sys.exit(main(default_config="ddpo_sd"))
