"""Checkpoint conversion, one subcommand per direction (see the README section "Use the result"):

    nad-convert to-diffusers  RUN_OR_CKPT_OR_NEMO OUT_DIR  [--base DIR] [--lora-scale s]
    nad-convert to-lora       RUN_OR_CKPT_OR_NEMO OUT_DIR  [--base DIR]
    nad-convert to-nemo       RUN_OR_CKPT_OR_NEMO_OR_DIFFUSERS OUT.nemo [--base DIR] [--layout ldm|nemo_hf]
    nad-convert from-nemo     NEMO_SD.nemo|.ckpt OUT_DIR --base DIR [--layout ldm|nemo_hf]
    nad-convert from-nemo-lora NEMO_ALIGNER.nemo|.ckpt OUT_DIR --base DIR [--alpha A]

Exit code 2 and one message on bad input; no output is left behind on failure.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from ..errors import InputError, attributed, report


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nad-convert", description="checkpoint conversion (diffusers <-> NeMo)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("to-diffusers", "training output -> diffusers pipeline dir with the LoRA merged"),
                        ("to-lora", "training output -> diffusers LoRA safetensors"),
                        ("to-nemo", "training output or diffusers pipeline -> NeMo Stable Diffusion .nemo")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("source", help="run directory, *.ckpt or .nemo of a nemo_aligner_draft run"
                       + (" (or a diffusers pipeline directory)" if name == "to-nemo" else ""))
        s.add_argument("out")
        s.add_argument("--base", default=None, help="diffusers pipeline dir (default: the run's model.pretrained)")
        if name == "to-diffusers":
            s.add_argument("--lora-scale", type=float, default=1.0)
        if name == "to-nemo":
            s.add_argument("--layout", default="ldm", choices=["ldm", "nemo_hf"])
    s = sub.add_parser("from-nemo", help="NeMo Stable Diffusion .nemo/.ckpt -> diffusers pipeline dir")
    s.add_argument("source")
    s.add_argument("out")
    s.add_argument("--base", required=True, help="diffusers pipeline of the same architecture (text encoder, "
                   "tokenizer, scheduler, configs)")
    s.add_argument("--layout", default=None, choices=["ldm", "nemo_hf"], help="default: detected from the keys")
    s = sub.add_parser("from-nemo-lora", help="NeMo-Aligner DRaFT+ LoRA adapters -> diffusers LoRA safetensors")
    s.add_argument("source")
    s.add_argument("out")
    s.add_argument("--base", required=True, help="diffusers pipeline of the base model")
    s.add_argument("--alpha", type=float, default=None,
                   help="network_alpha of the run (default: from the .nemo config, else alpha = rank)")
    return p.parse_args(argv)


def run(args) -> str:
    """The conversion; what goes wrong is blamed on the source (every message names the file it read)."""
    with attributed("source", "the checkpoint", args.source):
        return _convert(args)


def _convert(args) -> str:
    if args.command == "to-diffusers":
        from ..export.to_diffusers import export_diffusers

        return export_diffusers(args.source, args.out, args.base, args.lora_scale)
    if args.command == "to-lora":
        from ..export.to_diffusers import export_lora_file

        return export_lora_file(args.source, args.out, args.base)
    if args.command == "to-nemo":
        from ..export.to_nemo import export_nemo

        return export_nemo(args.source, args.out, args.base, args.layout)
    if args.command == "from-nemo":
        from ..export.from_nemo import import_nemo

        return import_nemo(args.source, args.base, args.out, args.layout)
    if args.command == "from-nemo-lora":
        from ..export.from_nemo import import_nemo_lora

        return import_nemo_lora(args.source, args.base, args.out, args.alpha)
    raise ValueError(args.command)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        out = run(args)
    except InputError as e:
        return report(e, f"nad-convert {args.command}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
