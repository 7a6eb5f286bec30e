"""`nad-convert to-diffusers` as a script: `python examples/mm/stable_diffusion/convert_to_diffusers.py SOURCE OUT [options]`
(see the README section "Use the result" and `--help`)."""
import sys

from nemo_aligner_draft.cli.convert import main

if __name__ == "__main__":
    sys.exit(main(["to-diffusers", *sys.argv[1:]]))
