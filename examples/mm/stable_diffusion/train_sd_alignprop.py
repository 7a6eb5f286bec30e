"""AlignProp (reward backpropagation with randomised truncation) for Stable Diffusion 1.x/2.x.

    python examples/mm/stable_diffusion/train_sd_alignprop.py --config-path=conf --config-name=alignprop_aesthetic \
        model.pretrained=/models/sd15 model.data.train.dataset_path=prompts.txt rm.model.restore_from_path=/models/aesthetic_head.pth rm.kwargs.clip_path=/models/clip-vit-large-patch14

Other configs for this method: conf/alignprop_*.yaml (the *_tiny one runs on CPU in seconds).
"""
import sys

from nemo_aligner_draft.cli.train import main

if __name__ == "__main__":
    sys.exit(main(default_config="alignprop_aesthetic"))
