"""Generate images with a base model, a LoRA, a LoRA soup or annealed importance guidance.

    python examples/mm/stable_diffusion/generate.py --model /models/sd15 \
        --lora runs/draftp/export --aig power_2 --prompt-file prompts.txt --out samples/

Same flags as the ``nad-generate`` console script (``--help`` lists them).
"""
import sys

from nemo_aligner_draft.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
