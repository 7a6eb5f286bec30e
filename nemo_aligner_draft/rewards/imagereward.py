"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"), loaded from the released ``ImageReward.pt``, differentiable in the image.

The model is BLIP's: a ViT (ViT-L/16 at 224 px in the release) encodes the image; a BERT text encoder
whose layers also cross-attend to the image tokens reads the prompt; the hidden state of the first
token goes through an MLP head, and the score is standardised with the release's constants:

    e = ViT(preprocess(x))                              [B, 1 + N, D_v]
    h = BERT(tokens(c), cross-attending to e)[:, 0]     [B, D_t]
    r = (MLP(h) − 0.16717362830052426) / 1.0333394966054072

as ``ImageReward.score()`` / ``score_gard()`` compute it (THUDM/ImageReward, ``ImageReward/ImageReward.py``).
Details taken from that repository (commit c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb):

- tokens: ``bert-base-uncased``'s BertTokenizer with ``[DEC]`` (bos) and ``[ENC]`` added, as BLIP's
  ``init_tokenizer`` does (30522 + 2 = the 30524 rows of the text embedding), ``padding="max_length",
  truncation=True, max_length=35``. The first token stays ``[CLS]``: ImageReward's scoring never swaps
  in ``enc_token_id`` (BLIP's ITM head does; ImageReward does not).
- preprocessing: torchvision ``Resize(224, BICUBIC)`` (short side, on PIL: antialiased) →
  ``CenterCrop(224)`` (round-half margins) → ``Normalize`` with OpenAI CLIP's mean/std; done here in torch.
- ViT (``models/BLIP/vit.py``): pre-norm blocks, fused qkv with bias, LayerNorm eps 1e-6, exact GELU,
  final ``norm``; all tokens go to the text encoder.
- BERT (``models/BLIP/med.py``, ``mode="multimodal"``): post-norm layers ``self-attention →
  cross-attention (keys/values from the image tokens, no mask) → feed-forward``; word + absolute
  position embeddings (no token types); the padding mask applies to self-attention only. Sizes come
  from ``med_config.json``, except ``encoder_width``, which BLIP overrides with the ViT's width (the
  released file says 768 for a 1024-wide ViT-L) — so does this loader.
- head: ``MLP(768)``: Linear(768, 1024) · Dropout · Linear(1024, 128) · Dropout · Linear(128, 64) ·
  Dropout · Linear(64, 16) · Linear(16, 1), no nonlinearities — the LAION aesthetic head's layout
  (:class:`~.aesthetic.AestheticHead`), under ``mlp.layers.*``.

The checkpoint is ``torch.save(ImageReward().state_dict())``: keys ``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``, plus entries ImageReward's own ``load()`` (``strict=False``)
carries along unused: BLIP's contrastive projections ``blip.vision_proj.*`` / ``blip.text_proj.*`` and
the ``blip.text_encoder.embeddings.position_ids`` buffer. Those are dropped (:data:`UNUSED_KEYS`);
every other key must match this module's own state dict exactly (``load_state_dict(strict=True)``).
The ViT's size is read from the checkpoint (width and patch from ``patch_embed.proj``, image size from
the length of ``pos_embed``, depth from the block count, MLP width from ``fc1``); its head count is not
stored: ``vision_heads`` defaults to width / 64 (16 for ViT-L, 12 for ViT-B).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..files import load_state_dict_file
from .aesthetic import AestheticHead
from .base import Reward, _at_least_fp32, register_reward
from .clip import require_path
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocess, ClipPreprocessConfig

NAME = "imagereward"
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35
VIT_LAYER_NORM_EPS = 1e-6
# In the released file, read by nothing that computes the score.
UNUSED_KEYS = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
               "blip.text_encoder.embeddings.position_ids")
MED_CONFIG_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                       "max_position_embeddings", "layer_norm_eps")
_TOKEN_CACHE_SIZE = 4096


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class VisionSize:
    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_width: int


@dataclass(frozen=True)
class TextSize:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float
    pad_token_id: int
    encoder_width: int


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H·d]`` → ``[B, H, L, d]``."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, d]`` → ``[B, L, H·d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


# --------------------------------------------------------------------------- BLIP's ViT
class PatchEmbed(torch.nn.Module):
    """Non-overlapping ``patch × patch`` patches → ``[B, N, D]`` (row-major over the grid)."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class ViTAttention(torch.nn.Module):
    """Self-attention with one fused projection; ``qkv`` rows are ``[q; k; v]``, each head-major."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class ViTMlp(torch.nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(width, hidden)
        self.fc2 = torch.nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(torch.nn.Module):
    """Pre-norm: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width, eps=VIT_LAYER_NORM_EPS)
        self.attn = ViTAttention(width, heads)
        self.norm2 = torch.nn.LayerNorm(width, eps=VIT_LAYER_NORM_EPS)
        self.mlp = ViTMlp(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionTransformer(torch.nn.Module):
    """``[B, 3, S, S]`` normalised pixels → image tokens ``[B, 1 + (S/p)², D]`` (class token first)."""

    def __init__(self, size: VisionSize):
        super().__init__()
        self.size = size
        grid = size.image_size // size.patch_size
        self.patch_embed = PatchEmbed(size.patch_size, size.width)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, size.width))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, grid * grid + 1, size.width))
        self.blocks = torch.nn.ModuleList(ViTBlock(size.width, size.heads, size.mlp_width) for _ in range(size.depth))
        self.norm = torch.nn.LayerNorm(size.width, eps=VIT_LAYER_NORM_EPS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.size.image_size
        if tuple(pixels.shape[-2:]) != (s, s):
            raise ValueError(f"reward {NAME!r}: the ViT takes {s}×{s} inputs, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --------------------------------------------------------------------------- BLIP's BERT (med.py)
class BertEmbeddings(torch.nn.Module):
    def __init__(self, size: TextSize):
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(size.vocab_size, size.hidden_size, padding_idx=size.pad_token_id)
        self.position_embeddings = torch.nn.Embedding(size.max_positions, size.hidden_size)
        self.LayerNorm = torch.nn.LayerNorm(size.hidden_size, eps=size.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class BertSelfAttention(torch.nn.Module):
    """Queries from the text; keys and values from the text itself or, for cross-attention, from
    the image tokens (``kv_width`` = the ViT's width)."""

    def __init__(self, size: TextSize, kv_width: int):
        super().__init__()
        self.heads = size.num_heads
        self.query = torch.nn.Linear(size.hidden_size, size.hidden_size)
        self.key = torch.nn.Linear(kv_width, size.hidden_size)
        self.value = torch.nn.Linear(kv_width, size.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        q = _split_heads(self.query(x), self.heads)
        k = _split_heads(self.key(context), self.heads)
        v = _split_heads(self.value(context), self.heads)
        return _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class BertResidualOutput(torch.nn.Module):
    """Post-norm residual: ``LayerNorm(dense(h) + x)``."""

    def __init__(self, in_width: int, size: TextSize):
        super().__init__()
        self.dense = torch.nn.Linear(in_width, size.hidden_size)
        self.LayerNorm = torch.nn.LayerNorm(size.hidden_size, eps=size.layer_norm_eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + x)


class BertAttention(torch.nn.Module):
    def __init__(self, size: TextSize, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(size, kv_width)
        self.output = BertResidualOutput(size.hidden_size, size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(torch.nn.Module):
    def __init__(self, size: TextSize):
        super().__init__()
        self.dense = torch.nn.Linear(size.hidden_size, size.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertCrossLayer(torch.nn.Module):
    def __init__(self, size: TextSize):
        super().__init__()
        self.attention = BertAttention(size, size.hidden_size)
        self.crossattention = BertAttention(size, size.encoder_width)
        self.intermediate = BertIntermediate(size)
        self.output = BertResidualOutput(size.intermediate_size, size)

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image_tokens, None)  # every image token is attended (image_atts = 1)
        return self.output(self.intermediate(x), x)


class BertEncoder(torch.nn.Module):
    def __init__(self, size: TextSize):
        super().__init__()
        self.layer = torch.nn.ModuleList(BertCrossLayer(size) for _ in range(size.num_layers))


class BlipTextEncoder(torch.nn.Module):
    """Token ids ``[B, L]`` + padding mask ``[B, L]`` + image tokens ``[B, T, D_v]`` → ``[B, L, D_t]``."""

    def __init__(self, size: TextSize):
        super().__init__()
        self.size = size
        self.embeddings = BertEmbeddings(size)
        self.encoder = BertEncoder(size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: padding is never a key
        for layer in self.encoder.layer:
            x = layer(x, image_tokens.to(x.dtype), keep)
        return x


class Blip(torch.nn.Module):
    """The part of BLIP ImageReward uses, under BLIP's attribute names."""

    def __init__(self, vision: VisionSize, text: TextSize):
        super().__init__()
        self.visual_encoder = BlipVisionTransformer(vision)
        self.text_encoder = BlipTextEncoder(text)


# --------------------------------------------------------------------------- the reward
class ImageRewardScore(Reward):
    """``[B, 3, H, W]`` in [0, 1] and ``B`` prompts → standardised ImageReward scores ``[B]``.

    The text encoder cross-attends to each image, so it runs per (image, prompt); only tokenisation
    is cached per prompt. Its state dict (``blip.*``, ``mlp.*``) is the release's minus :data:`UNUSED_KEYS`.
    """

    name = NAME

    def __init__(self, vision: VisionSize, text: TextSize, tokenizer, mlp_in: int):
        super().__init__()
        self.blip = Blip(vision, text)
        self.mlp = AestheticHead(in_dim=mlp_in)
        self.tokenizer = tokenizer
        self.preprocess = ClipPreprocess(ClipPreprocessConfig(
            size=vision.image_size, resize_mode="shortest", crop_size=(vision.image_size, vision.image_size),
            crop_rounding="round", interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD))
        self._tokens: "OrderedDict[str, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    def tokenize(self, prompts: Sequence[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, each ``[B, 35]`` (ImageReward pads every prompt to 35)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._tokens]
        if missing:
            enc = self.tokenizer(missing, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                 return_tensors="pt")
            for p, ids, mask in zip(missing, enc["input_ids"], enc["attention_mask"]):
                self._tokens[p] = (ids, mask)
            while len(self._tokens) > _TOKEN_CACHE_SIZE:
                self._tokens.popitem(last=False)
        ids = torch.stack([self._tokens[p][0] for p in prompts]).to(device)
        mask = torch.stack([self._tokens[p][1] for p in prompts]).to(device)
        return ids, mask

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if prompts is None or len(prompts) != images.shape[0]:
            raise ValueError(f"reward {NAME!r}: {images.shape[0]} images but "
                             f"{'no' if prompts is None else len(prompts)} prompts (it scores image and prompt together)")
        weight = self.mlp.layers[0].weight
        # resizing runs in float32 at least: CPU has no bf16 antialiased bicubic kernel
        pixels = self.preprocess(_at_least_fp32(images)).to(weight.dtype)
        image_tokens = self.blip.visual_encoder(pixels)
        input_ids, attention_mask = self.tokenize(list(prompts), weight.device)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        raw = self.mlp(hidden[:, 0].to(weight.dtype)).squeeze(-1)
        return (raw - SCORE_MEAN) / SCORE_STD


# --------------------------------------------------------------------------- loading
def vision_size_from_state_dict(sd: dict, path: str, heads: Optional[int] = None) -> VisionSize:
    """The ViT's size from ``blip.visual_encoder.*`` shapes; ``heads`` (not stored) defaults to width / 64."""
    prefix = "blip.visual_encoder."
    for key in ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if prefix + key not in sd:
            raise ValueError(f"reward {NAME!r}: {path!r} is not an ImageReward checkpoint: no key {prefix + key!r} "
                             f"(found e.g. {sorted(sd)[:4]})")
    proj = sd[prefix + "patch_embed.proj.weight"]  # [D, 3, p, p]
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    tokens = int(sd[prefix + "pos_embed"].shape[1])
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ValueError(f"reward {NAME!r}: {path!r}: {prefix}pos_embed has {tokens} positions, not 1 + a square grid")
    depth = len({int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k)] if m})
    if heads is None:
        if width % 64:
            raise ValueError(f"reward {NAME!r}: the ViT in {path!r} is {width} wide, not a multiple of 64; "
                             f"give its head count as rm.kwargs.vision_heads")
        heads = width // 64
    heads = int(heads)
    if heads <= 0 or width % heads:
        raise ValueError(f"reward {NAME!r}: vision_heads={heads} does not divide the ViT width {width}")
    return VisionSize(image_size=grid * patch, patch_size=patch, width=width, depth=depth, heads=heads,
                      mlp_width=int(sd[prefix + "blocks.0.mlp.fc1.weight"].shape[0]))


def read_med_config(path: str, encoder_width: int) -> TextSize:
    """BLIP's ``med_config.json`` (a BertConfig); ``encoder_width`` is the ViT's, as BLIP sets it."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"reward {NAME!r}: {path!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"reward {NAME!r}: {path!r} holds {type(cfg).__name__}, expected a JSON object (BertConfig)")
    missing = [k for k in MED_CONFIG_REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"reward {NAME!r}: {path!r} lacks key(s) {missing} of BLIP's med_config.json")
    if not cfg.get("add_cross_attention", False):
        raise ValueError(f"reward {NAME!r}: {path!r} has add_cross_attention={cfg.get('add_cross_attention')!r}; "
                         f"ImageReward's text encoder cross-attends to the image (expected true)")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"reward {NAME!r}: {path!r}: hidden_act={cfg['hidden_act']!r} is unsupported (expected 'gelu')")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"reward {NAME!r}: {path!r}: position_embedding_type={cfg['position_embedding_type']!r} is "
                         f"unsupported (expected 'absolute')")
    size = TextSize(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                    num_layers=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
                    intermediate_size=int(cfg["intermediate_size"]), max_positions=int(cfg["max_position_embeddings"]),
                    layer_norm_eps=float(cfg["layer_norm_eps"]), pad_token_id=int(cfg.get("pad_token_id", 0)),
                    encoder_width=int(encoder_width))
    if size.hidden_size % size.num_heads:
        raise ValueError(f"reward {NAME!r}: {path!r}: num_attention_heads={size.num_heads} does not divide "
                         f"hidden_size={size.hidden_size}")
    if size.max_positions < MAX_TEXT_TOKENS:
        raise ValueError(f"reward {NAME!r}: {path!r}: max_position_embeddings={size.max_positions} is below the "
                         f"{MAX_TEXT_TOKENS} tokens ImageReward feeds")
    return size


def load_blip_tokenizer(path: str):
    """A local BERT tokenizer directory (``bert-base-uncased``'s ``vocab.txt``, ...) with BLIP's two
    added tokens, ``[DEC]`` (bos) and ``[ENC]``, as ``init_tokenizer`` adds them."""
    from transformers import BertTokenizer

    path = require_path(path, NAME, "a BERT tokenizer directory (bert-base-uncased's vocab.txt, tokenizer_config.json)",
                        "dir")
    if not os.path.isfile(os.path.join(path, "vocab.txt")):
        raise FileNotFoundError(f"reward {NAME!r}: no vocab.txt in {path!r}; tokenizer_path must be a local "
                                f"bert-base-uncased tokenizer directory")
    tokenizer = BertTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward(path: str, med_config: Optional[str] = None, tokenizer_path: Optional[str] = None,
                     vision_heads: Optional[int] = None) -> ImageRewardScore:
    path = require_path(path, NAME, "the released ImageReward.pt (a state dict of the whole ImageReward module)", "file")
    here = os.path.dirname(os.path.abspath(path))
    med_config = require_path(med_config or os.path.join(here, "med_config.json"), NAME,
                              "BLIP's med_config.json (rm.kwargs.med_config; default: beside the checkpoint)", "file")
    sd = load_state_dict_file(path, f"reward {NAME!r}")
    sd = {k: v for k, v in sd.items() if k not in UNUSED_KEYS}
    head_key = "mlp.layers.0.weight"
    if head_key not in sd:
        raise ValueError(f"reward {NAME!r}: {path!r} has no {head_key!r}: the ImageReward MLP head "
                         f"(mlp.layers.{{0,2,4,6,7}}) is missing")
    vision = vision_size_from_state_dict(sd, path, vision_heads)
    text = read_med_config(med_config, encoder_width=vision.width)
    tokenizer = load_blip_tokenizer(tokenizer_path or here)
    if len(tokenizer) != text.vocab_size:
        raise ValueError(f"reward {NAME!r}: the tokenizer in {tokenizer_path or here!r} has {len(tokenizer)} tokens with "
                         f"[DEC] and [ENC] added, but {med_config!r} says vocab_size {text.vocab_size} "
                         f"(bert-base-uncased: 30522 + 2 = 30524)")
    reward = ImageRewardScore(vision, text, tokenizer, mlp_in=int(sd[head_key].shape[1]))
    expected = reward.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} key(s), e.g. {missing[:5]}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}"] if unexpected else [])
        raise ValueError(f"reward {NAME!r}: {path!r} does not match the ImageReward layout "
                         f"(ViT {vision.depth}×{vision.width}, BERT {text.num_layers}×{text.hidden_size} from "
                         f"{med_config!r}): {'; '.join(parts)}")
    wrong = [f"{k}: {tuple(sd[k].shape)} in the file, {tuple(t.shape)} expected"
             for k, t in expected.items() if tuple(sd[k].shape) != tuple(t.shape)]
    if wrong:
        raise ValueError(f"reward {NAME!r}: {path!r} does not fit {med_config!r}: {'; '.join(wrong[:3])}")
    reward.load_state_dict(sd, strict=True)
    return reward


@register_reward(NAME)
def imagereward(path: Optional[str] = None, med_config: Optional[str] = None, tokenizer_path: Optional[str] = None,
                vision_heads: Optional[int] = None, **kwargs) -> Reward:
    """``path``: ``ImageReward.pt``; ``med_config``: BLIP's ``med_config.json`` and ``tokenizer_path``: a
    local ``bert-base-uncased`` tokenizer directory (both default to the checkpoint's directory);
    ``vision_heads``: the ViT's head count (default width / 64)."""
    if kwargs:
        raise ValueError(f"reward {NAME!r}: unknown arguments {sorted(kwargs)} "
                         f"(accepted: med_config, tokenizer_path, vision_heads)")
    return load_imagereward(path, med_config=med_config, tokenizer_path=tokenizer_path, vision_heads=vision_heads)
