"""Sample diversity per prompt: LPIPS (Zhang et al. 2018) and embedding cosine distance.

For each prompt with n ≥ 2 images, diversity = mean over the n(n−1)/2 unordered pairs of d(x_i, x_j);
the overall value is the mean of the per-prompt values (every prompt weighs the same). Prompts with a
single image have no pairs and are left out. Images are ``[N, 3, H, W]`` float in [0, 1]. These are
evaluation metrics: computed under no_grad.

LPIPS weights: the ``lpips`` wheel ships only its linear heads; the backbone (torchvision AlexNet,
VGG16 or SqueezeNet1.1 ImageNet weights) is normally downloaded by torchvision. Here it never is:
pass ``backbone_path``, the torchvision ``state_dict`` file of that backbone (``alexnet-owt-7be5be79.pth``,
``vgg16-397923af.pth``, ``squeezenet1_1-b8a52dc0.pth``), or ``pnet_rand=True`` (random backbone, tests).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..files import load_state_dict_file

PairDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # [P,3,H,W] × [P,3,H,W] → [P]

_LPIPS_NETS = {"alex": "alexnet", "vgg": "vgg16", "vgg16": "vgg16", "squeeze": "squeezenet1_1"}


def _pairs(n: int, device) -> torch.Tensor:
    return torch.triu_indices(n, n, offset=1, device=device)  # [2, n(n-1)/2], i < j


def mean_pairwise(images: torch.Tensor, distance: PairDistance, batch_size: int = 64) -> torch.Tensor:
    """Mean of ``distance(x_i, x_j)`` over all pairs i < j of ``images [n, ...]`` (n ≥ 2); scalar."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"mean pairwise distance needs at least 2 images, got {n}")
    idx = _pairs(n, images.device)
    total = images.new_zeros((), dtype=torch.float64)
    for s in range(0, idx.shape[1], batch_size):
        i, j = idx[0, s:s + batch_size], idx[1, s:s + batch_size]
        total = total + distance(images[i], images[j]).double().sum()
    return (total / idx.shape[1]).float()


def diversity_per_prompt(images: torch.Tensor, prompts: Sequence[str], distance: PairDistance,
                         batch_size: int = 64) -> Dict[str, object]:
    """Group ``images [N, ...]`` by ``prompts`` (length N) and average pairwise distances.

    Returns ``{"mean": float, "per_prompt": {prompt: float}}``; ``mean`` is NaN when no prompt has
    two images.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    groups: Dict[str, List[int]] = {}
    for k, p in enumerate(prompts):
        groups.setdefault(p, []).append(k)
    per_prompt = {}
    with torch.no_grad():
        for p, ks in groups.items():
            if len(ks) >= 2:
                sel = torch.tensor(ks, device=images.device)
                per_prompt[p] = mean_pairwise(images[sel], distance, batch_size).item()
    mean = sum(per_prompt.values()) / len(per_prompt) if per_prompt else float("nan")
    return {"mean": mean, "per_prompt": per_prompt}


def _load_torchvision_backbone(net, lpips_net: str, path: str) -> None:
    """Copy a torchvision ``features.{i}.*`` state dict into lpips' ``slice{k}.{i}.*`` modules (lpips
    keeps torchvision's layer indices inside its slices); classifier weights are ignored."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS backbone_path {path!r} does not exist; expected the torchvision "
                                f"{_LPIPS_NETS[lpips_net]} state dict file (ImageNet weights)")
    sd = load_state_dict_file(path, "LPIPS backbone_path")
    target = net.net.state_dict()
    new_sd = {}
    for key in target:
        m = re.fullmatch(r"slice\d+\.(\d+)\.(.+)", key)
        src = f"features.{m.group(1)}.{m.group(2)}" if m else key
        if src not in sd:
            raise ValueError(f"LPIPS backbone_path {path!r} has no key {src!r}: expected a torchvision "
                             f"{_LPIPS_NETS[lpips_net]} state dict")
        if sd[src].shape != target[key].shape:
            raise ValueError(f"LPIPS backbone_path {path!r}: {src!r} has shape {tuple(sd[src].shape)}, "
                             f"expected {tuple(target[key].shape)} for {_LPIPS_NETS[lpips_net]}")
        new_sd[key] = sd[src]
    net.net.load_state_dict(new_sd, strict=True)


class LpipsDiversity(torch.nn.Module):
    """LPIPS v0.1 distance with a locally loaded backbone; call ``(images, prompts)`` for per-prompt
    diversity, or use ``distance(a, b) -> [P]`` directly (inputs in [0, 1])."""

    def __init__(self, net: str = "alex", backbone_path: Optional[str] = None, pnet_rand: bool = False,
                 batch_size: int = 16):
        super().__init__()
        if net not in _LPIPS_NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_NETS)}, got {net!r}")
        if backbone_path is None and not pnet_rand:
            raise ValueError(
                f"LPIPS needs local backbone weights: set backbone_path to the torchvision {_LPIPS_NETS[net]} "
                f"state dict file (downloads are disabled), or pnet_rand=True for a random backbone (tests only)")
        if backbone_path is not None and pnet_rand:
            raise ValueError("LPIPS: give backbone_path or pnet_rand=True, not both")
        import lpips

        lpips_net = "vgg" if net == "vgg16" else net
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated pretrained=False
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand=True always: it is what keeps torchvision from downloading the backbone; the
            # real weights are copied in below. The linear heads come from the lpips wheel.
            self.lpips = lpips.LPIPS(net=lpips_net, pretrained=True, pnet_rand=True, verbose=False)
        if backbone_path is not None:
            _load_torchvision_backbone(self.lpips, lpips_net, os.path.expanduser(str(backbone_path)))
        self.lpips.requires_grad_(False).eval()
        self.batch_size = batch_size

    def train(self, mode: bool = True):  # a metric: always eval
        return super().train(False)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS between ``a[p]`` and ``b[p]``, both ``[P, 3, H, W]`` in [0, 1]; returns ``[P]``."""
        return self.lpips(a.float(), b.float(), normalize=True).flatten()

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> Dict[str, object]:
        return diversity_per_prompt(images, prompts, self.distance, self.batch_size)


class EmbeddingDiversity:
    """Cosine distance ``1 − cos(f(x_i), f(x_j))`` of an image-embedding function
    ``f: [N, 3, H, W] → [N, D]`` (e.g. the embedded model's CLIP image tower)."""

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64):
        self.embed = embed
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> Dict[str, object]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        with torch.no_grad():
            emb = F.normalize(self.embed(images).float().flatten(1), dim=-1)
        # distances between precomputed embeddings: the "images" handed to mean_pairwise are embeddings
        return diversity_per_prompt(emb, prompts, lambda u, v: 1.0 - (u * v).sum(dim=-1), self.batch_size)
