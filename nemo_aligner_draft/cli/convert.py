"""Checkpoint conversion, one subcommand per direction (see the README section "Use the result"):

    nad-convert to-diffusers  RUN_OR_CKPT_OR_NEMO OUT_DIR  [--base DIR] [--lora-scale s]
    nad-convert to-lora       RUN_OR_CKPT_OR_NEMO OUT_DIR  [--base DIR]
    nad-convert to-nemo       RUN_OR_CKPT_OR_NEMO_OR_DIFFUSERS OUT.nemo [--base DIR] [--layout nemo|ldm|nemo_hf]
    nad-convert from-nemo     NEMO_SD.nemo|.ckpt OUT_DIR --base DIR [--layout ldm|nemo_hf]
    nad-convert from-nemo-lora NEMO_ALIGNER.nemo|.ckpt OUT_DIR --base DIR [--alpha A|null]
    nad-convert to-nemo-lora  LORA_OR_RUN OUT.nemo|OUT.ckpt [--base DIR] [--with-init-model] [--fill-missing]

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
            s.add_argument("--layout", default="nemo", choices=["nemo", "ldm", "nemo_hf"],
                           help="nemo (default): NeMo's module tree, what MegatronLatentDiffusion.restore_from "
                                "loads; ldm / nemo_hf: the UNet+VAE key layouts of ldm_layout")
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
    s.add_argument("--alpha", type=_alpha, default=_UNSET,
                   help="network_alpha of the run, or null (NeMo: no scaling); default: from the checkpoint's "
                        "config (.nemo model_config.yaml or .ckpt hyper_parameters), else null")
    s = sub.add_parser("to-nemo-lora", help="diffusers LoRA (or a LoRA run) -> NeMo-Aligner DRaFT+ adapters "
                                            "(.nemo or .ckpt, what model.peft.restore_from_path loads)")
    s.add_argument("source", help="pytorch_lora_weights.safetensors or its directory, or a run dir / *.ckpt / "
                                  ".nemo of a nemo_aligner_draft LoRA run")
    s.add_argument("out", help="OUT.nemo (NeMo archive) or OUT.ckpt ({'state_dict': adapters})")
    s.add_argument("--base", default=None, help="diffusers pipeline dir (required for a LoRA file; default for a "
                                                "run: its model.pretrained)")
    s.add_argument("--with-init-model", action="store_true",
                   help="also write the reference's init_model.* adapters (linear_out zero), as NeMo 1.x counts them")
    s.add_argument("--fill-missing", action="store_true",
                   help="write zero adapters (dW = 0) for LinearWrappers the LoRA does not adapt")
    return p.parse_args(argv)


_UNSET = object()


def _alpha(text: str):
    if text.strip().lower() in ("null", "none", "~"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or null, got {text!r}") from None


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

        if args.alpha is _UNSET:
            return import_nemo_lora(args.source, args.base, args.out)
        return import_nemo_lora(args.source, args.base, args.out, args.alpha)
    if args.command == "to-nemo-lora":
        from ..export.to_nemo_lora import export_nemo_lora

        return export_nemo_lora(args.source, args.out, args.base, args.with_init_model, args.fill_missing)
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
