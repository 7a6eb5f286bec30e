"""Annealed importance guidance between the base and the DRaFT+ fine-tuned SDXL model, as NeMo-Aligner's
``examples/mm/stable_diffusion/anneal_sdxl.py`` runs it (same config keys, ``+prompt=``, ``+weight_type=``):

    torchrun --nproc_per_node=8 examples/mm/stable_diffusion/anneal_sdxl.py --config-path=<conf> \
        --config-name=draftp_sdxl exp_manager.explicit_log_dir=<run> +prompt="Bananas growing on an apple tree" \
        +weight_type='draft,base,power_2.0' ...
"""
import sys

from nemo_aligner_draft.cli.anneal import main

if __name__ == "__main__":
    sys.exit(main(default_config="draftp_sdxl"))
