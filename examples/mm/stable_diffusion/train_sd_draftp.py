"""DRaFT+ for Stable Diffusion 1.x/2.x (NeMo-Aligner's entry point, same flags).

    python examples/mm/stable_diffusion/train_sd_draftp.py --config-path=conf --config-name=draftp_sd \
        model.pretrained=/models/sd15 model.data.train.dataset_path=prompts.txt \
        rm.model.restore_from_path=/models/pickscore
"""
import sys

from nemo_aligner_draft.cli.train import main

if __name__ == "__main__":
    sys.exit(main(default_config="draftp_sd"))
