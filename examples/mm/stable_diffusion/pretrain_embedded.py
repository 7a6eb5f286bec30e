"""Pretrain the embedded tiny text-to-image model and TinyCLIP on the procedural shapes domain (CPU).

    python examples/mm/stable_diffusion/pretrain_embedded.py                 # the shipped weights
    python examples/mm/stable_diffusion/pretrain_embedded.py --quick --out /tmp/e   # seconds, for tests
    python examples/mm/stable_diffusion/pretrain_embedded.py --parts sd      # only VAE + UNet + text

Writes ``OUT/sd`` (diffusers StableDiffusionPipeline directory), ``OUT/tinyclip`` (transformers
CLIPModel + CLIPProcessor directory), ``OUT/{train,heldout}_prompts.txt`` and ``OUT/pretrain_*.json``
(settings, per-part seconds, parameter counts, final losses). Default ``OUT`` is the package's
``nemo_aligner_draft/embedded/assets``. The shipped run's measured time is in
``nemo_aligner_draft/embedded/README.md``.
"""
import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from nemo_aligner_draft.embedded import models  # noqa: E402
from nemo_aligner_draft.embedded.pretrain import PretrainConfig, pretrain  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=models.ASSETS, help="output directory (default: the package assets)")
    p.add_argument("--quick", action="store_true", help="tiny data set and 2 steps per part (seconds)")
    p.add_argument("--steps", type=int, default=None, help="set the VAE, UNet and TinyCLIP step counts to N")
    p.add_argument("--unet-steps", type=int, default=None, help="set the UNet step count (after --steps)")
    p.add_argument("--n-images", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results are repeatable per count)")
    p.add_argument("--parts", default="sd,clip",
                   help="comma list of: sd (VAE+UNet+text encoder), unet (UNet+text encoder on the VAE already in "
                        "OUT/sd), decoder (optional VAE decoder fine-tune of OUT/sd, not used for the shipped "
                        "weights), clip")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = PretrainConfig.quick() if args.quick else PretrainConfig()
    cfg.seed = args.seed
    if args.steps is not None:
        cfg.vae_steps = cfg.unet_steps = cfg.clip_steps = args.steps
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    if args.n_images is not None:
        cfg.n_images = args.n_images
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(parts) - {"sd", "unet", "decoder", "clip"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; expected sd, unet, decoder, clip")
    logs = pretrain(args.out, cfg, parts)
    for name, log in logs.items():
        print(f"{name}: {log['total_seconds']} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
