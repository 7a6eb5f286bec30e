"""DRaFT+ for SDXL: the same entry point and code path as SD, with conf/draftp_sdxl.yaml.

    python examples/mm/stable_diffusion/train_sdxl_draftp.py --config-path=conf --config-name=draftp_sdxl \
        model.pretrained=/models/sdxl-base-1.0 model.data.train.dataset_path=prompts.txt \
        rm.model.restore_from_path=/models/pickscore
"""
import sys

from nemo_aligner_draft.cli.train import main

if __name__ == "__main__":
    sys.exit(main(default_config="draftp_sdxl"))
