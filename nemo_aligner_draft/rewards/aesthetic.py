"""LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``), differentiable.

score = MLP(e / ‖e‖) with e the CLIP ViT-L/14 image embedding (``get_image_features``, 768-d).
The head's state-dict layout is LAION's: ``layers.{0,2,4,6,7}.{weight,bias}`` for
Linear(768,1024) · Dropout · Linear(1024,128) · Dropout · Linear(128,64) · Dropout · Linear(64,16) ·
Linear(16,1) — no nonlinearities, as released. The score is on the AVA 1–10 scale. ddpo-pytorch
scored it under no_grad; here the gradient flows into the image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..files import load_state_dict_file
from .base import Reward, register_reward
from .clip import ClipEncoder, load_hf_clip, require_path

_LINEAR_KEYS = (0, 2, 4, 6, 7)


class AestheticHead(torch.nn.Module):
    """LAION's MLP; ``in_dim`` is 768 for ViT-L/14. Dropout layers keep their indices so the
    released state dict loads as is (they are inactive: rewards stay in eval mode)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_dim, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


def load_aesthetic_head(path: str) -> AestheticHead:
    path = require_path(path, "aesthetic", "the LAION aesthetic MLP state dict (sac+logos+ava1-l14-linearMSE.pth)", "file")
    sd = load_state_dict_file(path, "reward 'aesthetic'")
    if "layers.0.weight" not in sd:
        keys = sorted(sd)[:6] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"reward 'aesthetic': {path!r} is not a LAION aesthetic head: expected key 'layers.0.weight' "
                         f"(Linear(768, 1024)), found {keys}")
    head = AestheticHead(in_dim=int(sd["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"reward 'aesthetic': {path!r} does not match the LAION head layout "
                         f"(layers.{{0,2,4,6,7}}.weight/bias): {e}") from e
    return head


class AestheticReward(Reward):
    """``[B, 3, H, W]`` in [0, 1] → predicted aesthetic score ``[B]`` (prompt-independent)."""

    name = "aesthetic"

    def __init__(self, encoder: ClipEncoder, head: AestheticHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        emb = F.normalize(self.encoder.encode_images(images), dim=-1)
        return self.head(emb.to(self.head.layers[0].weight.dtype)).squeeze(-1)


@register_reward("aesthetic")
def aesthetic(path: Optional[str] = None, clip_path: Optional[str] = None, processor_path: Optional[str] = None,
              **kwargs) -> Reward:
    """``path``: the MLP head file; ``clip_path``: a HF ``CLIPModel`` directory of CLIP ViT-L/14
    (``openai/clip-vit-large-patch14``) with its processor files."""
    if kwargs:
        raise ValueError(f"reward 'aesthetic': unknown arguments {sorted(kwargs)}")
    head = load_aesthetic_head(path)
    if not clip_path:
        raise FileNotFoundError("reward 'aesthetic' needs clip_path: a local Hugging Face CLIPModel directory of "
                                "CLIP ViT-L/14 (the embedding the head was trained on)")
    enc = load_hf_clip(clip_path, "aesthetic", processor_path)
    dim = int(enc.model.config.projection_dim)
    if dim != head.layers[0].in_features:
        raise ValueError(f"reward 'aesthetic': the head at {path!r} takes {head.layers[0].in_features}-d embeddings but "
                         f"the CLIP at {clip_path!r} has projection_dim {dim}")
    return AestheticReward(enc, head)
