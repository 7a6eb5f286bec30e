"""`nad-convert to-nemo` as a script: `python examples/mm/stable_diffusion/convert_to_nemo.py SOURCE OUT [options]`
(see the README section "Use the result" and `--help`)."""
import sys

from nemo_aligner_draft.cli.convert import main

if __name__ == "__main__":
    sys.exit(main(["to-nemo", *sys.argv[1:]]))
