"""CLIP-based rewards: ``clip_score``, ``pickscore``, ``hpsv2``.

All three are ``scale · cos(E_img(preprocess(x)), E_txt(prompt))`` on a CLIP-like dual encoder:

- ``clip_score``: scale = ``scale`` kwarg (default 1.0, so the reward is the plain cosine in [−1, 1];
  Hessel et al.'s CLIPScore is 2.5·max(cos, 0), torchmetrics' is 100·cos). Hugging Face
  ``CLIPModel`` directory (``backend="hf"``) or an open_clip checkpoint (``backend="open_clip"``).
- ``pickscore`` (Kirstain et al. 2023): scale = ``logit_scale.exp()`` of the model (≈100 for the
  released PickScore_v1), as its reference inference code computes it. HF ``CLIPModel`` directory;
  the processor (tokenizer + preprocessor_config.json) from ``processor_path`` or the same directory.
- ``hpsv2`` (Wu et al. 2023): open_clip ``ViT-H-14`` with the HPS checkpoint (a state dict, possibly
  under ``"state_dict"``); scale 1 — HPSv2 reports the image·text cosine of normalised features.

Everything is loaded from local paths only; nothing is downloaded.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..files import load_state_dict_file
from .base import Reward, _at_least_fp32, register_reward
from .preprocess import ClipPreprocess, config_from_hf_image_processor, config_from_open_clip


def require_path(path: Optional[str], reward: str, what: str, kind: str = "any") -> str:
    """Check a local weights path exists; ``kind`` is "dir", "file" or "any"."""
    if not path:
        raise FileNotFoundError(f"reward {reward!r} needs a local path to {what} (rm.model.restore_from_path); none given")
    path = os.path.expanduser(str(path))
    ok = {"dir": os.path.isdir, "file": os.path.isfile, "any": os.path.exists}[kind](path)
    if not ok:
        raise FileNotFoundError(f"reward {reward!r}: {path!r} does not exist or is not a {kind if kind != 'any' else 'path'}; "
                                f"expected {what}")
    return path


class ClipEncoder(torch.nn.Module):
    """A frozen dual encoder: ``encode_images([B,3,H,W] in [0,1]) -> [B, D]`` and ``encode_text(prompts)
    -> [B, D]`` (both unnormalised), plus ``logit_scale`` (log of the learned temperature)."""

    preprocess: ClipPreprocess

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError


class HFClipEncoder(ClipEncoder):
    """A transformers ``CLIPModel`` with its tokenizer and image-processor settings."""

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess, max_length: int = 77):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.max_length = max_length

    def encode_images(self, images):
        pixels = self.preprocess(images)
        return self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)).pooler_output

    def encode_text(self, prompts):
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = self.model.logit_scale.device
        return self.model.get_text_features(input_ids=tok["input_ids"].to(device),
                                            attention_mask=tok["attention_mask"].to(device)).pooler_output

    @property
    def logit_scale(self):
        return self.model.logit_scale


class OpenClipEncoder(ClipEncoder):
    """An open_clip model with its tokenizer and its ``preprocess_cfg``."""

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    def encode_images(self, images):
        return self.model.encode_image(self.preprocess(images))

    def encode_text(self, prompts):
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.model.logit_scale.device))

    @property
    def logit_scale(self):
        return self.model.logit_scale


def load_hf_clip(path: str, reward: str, processor_path: Optional[str] = None) -> HFClipEncoder:
    """Load a Hugging Face ``CLIPModel`` directory (config.json + weights) and its processor files
    (tokenizer + preprocessor_config.json or transformers 5's processor_config.json; from ``processor_path`` when they live elsewhere, as for
    PickScore whose processor is the laion ViT-H-14 one)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path = require_path(path, reward, "a Hugging Face CLIPModel directory (config.json + weights)", "dir")
    proc_dir = require_path(processor_path or path, reward,
                            "a directory with the CLIP tokenizer and preprocessor_config.json", "dir")
    model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(proc_dir, local_files_only=True)
        image_proc = CLIPImageProcessor.from_pretrained(proc_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"reward {reward!r}: no CLIP processor in {proc_dir!r} (expected the tokenizer files and "
            f"preprocessor_config.json or processor_config.json, as CLIPProcessor.save_pretrained writes them); "
            f"pass processor_path if they live elsewhere. Cause: {e}") from e
    preprocess = ClipPreprocess(config_from_hf_image_processor(image_proc))
    max_length = min(int(model.config.text_config.max_position_embeddings), 77)
    return HFClipEncoder(model, tokenizer, preprocess, max_length=max_length)


def load_open_clip_state_dict(path: str, reward: str) -> dict:
    """A state dict from an open_clip/HPS checkpoint file: a plain state dict or one under
    ``"state_dict"``; the ``module.`` prefix that DDP training leaves is removed."""
    path = require_path(path, reward, "an open_clip checkpoint file (a state dict, .pt/.bin/.safetensors)", "file")
    sd = load_state_dict_file(path, f"reward {reward!r}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_open_clip(path: str, reward: str, arch: str) -> OpenClipEncoder:
    """Build open_clip architecture ``arch`` with random weights (``pretrained=None``: no download)
    and load the checkpoint at ``path`` into it strictly."""
    import open_clip

    sd = load_open_clip_state_dict(path, reward)
    if arch not in open_clip.list_models():
        raise ValueError(f"reward {reward!r}: unknown open_clip architecture {arch!r}; "
                         f"register its config with open_clip.add_model_config or pick one of open_clip.list_models()")
    model = open_clip.create_model(arch, pretrained=None, pretrained_image=False, pretrained_text=False)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"reward {reward!r}: checkpoint {path!r} does not fit open_clip architecture {arch!r}: {e}") from e
    tokenizer = open_clip.get_tokenizer(arch)
    return OpenClipEncoder(model, tokenizer, ClipPreprocess(config_from_open_clip(model)))


class ClipCosineReward(Reward):
    """``r = s · cos(E_img(x), E_txt(c))`` ``[B]``; ``s`` a constant, or ``exp(logit_scale)`` when
    ``use_logit_scale``."""

    def __init__(self, encoder: ClipEncoder, name: str, scale: float = 1.0, use_logit_scale: bool = False):
        super().__init__()
        self.encoder = encoder
        self.name = name
        self.scale = float(scale)
        self.use_logit_scale = use_logit_scale

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        img = F.normalize(_at_least_fp32(self.encoder.encode_images(images)), dim=-1)
        txt = F.normalize(_at_least_fp32(self.encoder.encode_text(prompts)), dim=-1)
        cos = (img * txt.to(img.dtype)).sum(dim=-1)
        scale = _at_least_fp32(self.encoder.logit_scale).exp() if self.use_logit_scale else self.scale
        return scale * cos


def _no_extra(reward: str, kwargs: dict):
    if kwargs:
        raise ValueError(f"reward {reward!r}: unknown arguments {sorted(kwargs)}")


@register_reward("clip_score")
def clip_score(path: Optional[str] = None, backend: str = "hf", arch: Optional[str] = None,
               processor_path: Optional[str] = None, scale: float = 1.0, **kwargs) -> Reward:
    """CLIP score = ``scale · cos`` (default scale 1: the raw cosine). ``backend="hf"``: ``path`` is a
    ``CLIPModel`` directory; ``backend="open_clip"``: ``path`` is a checkpoint file for ``arch``."""
    _no_extra("clip_score", kwargs)
    if backend == "hf":
        enc = load_hf_clip(path, "clip_score", processor_path)
    elif backend == "open_clip":
        if not arch:
            raise ValueError("reward 'clip_score' with backend='open_clip' needs arch (an open_clip model name, e.g. 'ViT-L-14')")
        enc = load_open_clip(path, "clip_score", arch)
    else:
        raise ValueError(f"reward 'clip_score': backend must be 'hf' or 'open_clip', got {backend!r}")
    return ClipCosineReward(enc, "clip_score", scale=scale)


@register_reward("pickscore")
def pickscore(path: Optional[str] = None, processor_path: Optional[str] = None, **kwargs) -> Reward:
    """PickScore: ``logit_scale.exp() · cos`` from a HF ``CLIPModel`` directory."""
    _no_extra("pickscore", kwargs)
    return ClipCosineReward(load_hf_clip(path, "pickscore", processor_path), "pickscore", use_logit_scale=True)


@register_reward("hpsv2")
def hpsv2(path: Optional[str] = None, arch: str = "ViT-H-14", **kwargs) -> Reward:
    """HPSv2 / v2.1: cosine of open_clip ``arch`` features with the HPS checkpoint at ``path``."""
    _no_extra("hpsv2", kwargs)
    return ClipCosineReward(load_open_clip(path, "hpsv2", arch), "hpsv2")
