"""A tiny random ImageReward checkpoint in the released on-disk format.

Layout read from THUDM/ImageReward at commit c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb (no code copied):
``ImageReward/ImageReward.py`` (``ImageReward``: ``blip = BLIP_Pretrain(...)``, ``mlp = MLP(768)`` with
``layers.{0,2,4,6,7}``), ``ImageReward/models/BLIP/blip_pretrain.py`` (``visual_encoder``, ``text_encoder =
BertModel(add_pooling_layer=False)`` with ``encoder_width`` = the ViT's width, ``vision_proj`` /
``text_proj`` = Linear(·, 256)), ``models/BLIP/vit.py`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``), ``models/BLIP/med.py``
(``embeddings.{position_ids buffer, word_embeddings, position_embeddings, LayerNorm}`` — no token types —
and ``encoder.layer.N.{attention, crossattention}.{self.{query,key,value}, output.{dense,LayerNorm}}``,
``intermediate.dense``, ``output.{dense,LayerNorm}``), ``ImageReward/utils.py`` (``load()`` fetches
``ImageReward.pt`` and ``med_config.json``; ``torch.load`` then ``load_state_dict(strict=False)``), and
``train/src/config/med_config.json`` (the keys written here; the Hub's copy was not reachable, the
repository's is BLIP's ``med_config.json``). ``ImageReward.pt`` is ``torch.save(model.state_dict())`` of
the whole module (``train/src/config/utils.py: save_model``), so it also holds ``vision_proj``,
``text_proj`` and the ``position_ids`` buffer (persistent in the transformers of the time).

The key names are written out here from that layout, not taken from the package's modules, so loading
the file checks the package against the upstream names. Weights are variance-preserving random
(std 1/√fan_in, LayerNorm gains ≈ 1, small random biases) so every parameter moves the score.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List

import torch

# vision: ViT at the real 224 px (so preprocessing is the real one) with 32-px patches; text: a 2-layer BERT.
TINY_IMAGEREWARD = dict(image_size=224, patch_size=32, vision_width=128, vision_depth=2, vision_mlp=512,
                        text_width=32, text_layers=2, text_heads=4, text_ffn=64, max_positions=64, proj_dim=256)
# bert-base-uncased's special tokens first (ids 0-4 here), then enough words for the test prompts.
TINY_VOCAB_WORDS = ("a an the of in at on with and photo painting oil red blue green fox cat dog snow lighthouse "
                    "dusk dawn sea sky city night portrait landscape tree house mountain river cartoon").split()
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BLIP_ADDED_TOKENS = 2  # [DEC] and [ENC], added by BLIP's init_tokenizer


def _linear(sd, g, name, n_out, n_in):
    sd[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) * n_in ** -0.5
    sd[f"{name}.bias"] = 0.1 * torch.randn(n_out, generator=g)


def _layer_norm(sd, g, name, n):
    sd[f"{name}.weight"] = 1.0 + 0.1 * torch.randn(n, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)


def tiny_vocab() -> List[str]:
    return SPECIAL_TOKENS + list(TINY_VOCAB_WORDS)


def tiny_imagereward_state_dict(seed: int = 0, **sizes) -> "OrderedDict[str, torch.Tensor]":
    """The released key set and order (module registration order), tiny sizes."""
    s = {**TINY_IMAGEREWARD, **sizes}
    g = torch.Generator().manual_seed(seed)
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    dv, dt, p = s["vision_width"], s["text_width"], s["patch_size"]
    grid = s["image_size"] // p
    v = "blip.visual_encoder"
    sd[f"{v}.cls_token"] = 0.5 * torch.randn(1, 1, dv, generator=g)
    sd[f"{v}.pos_embed"] = 0.5 * torch.randn(1, grid * grid + 1, dv, generator=g)
    sd[f"{v}.patch_embed.proj.weight"] = torch.randn(dv, 3, p, p, generator=g) * (3 * p * p) ** -0.5
    sd[f"{v}.patch_embed.proj.bias"] = 0.1 * torch.randn(dv, generator=g)
    for i in range(s["vision_depth"]):
        b = f"{v}.blocks.{i}"
        _layer_norm(sd, g, f"{b}.norm1", dv)
        _linear(sd, g, f"{b}.attn.qkv", 3 * dv, dv)
        _linear(sd, g, f"{b}.attn.proj", dv, dv)
        _layer_norm(sd, g, f"{b}.norm2", dv)
        _linear(sd, g, f"{b}.mlp.fc1", s["vision_mlp"], dv)
        _linear(sd, g, f"{b}.mlp.fc2", dv, s["vision_mlp"])
    _layer_norm(sd, g, f"{v}.norm", dv)

    t = "blip.text_encoder"
    vocab = len(tiny_vocab()) + BLIP_ADDED_TOKENS
    sd[f"{t}.embeddings.position_ids"] = torch.arange(s["max_positions"]).expand(1, -1).clone()
    sd[f"{t}.embeddings.word_embeddings.weight"] = torch.randn(vocab, dt, generator=g)
    sd[f"{t}.embeddings.position_embeddings.weight"] = torch.randn(s["max_positions"], dt, generator=g)
    _layer_norm(sd, g, f"{t}.embeddings.LayerNorm", dt)
    for i in range(s["text_layers"]):
        layer = f"{t}.encoder.layer.{i}"
        for block, kv_width in (("attention", dt), ("crossattention", dv)):
            _linear(sd, g, f"{layer}.{block}.self.query", dt, dt)
            _linear(sd, g, f"{layer}.{block}.self.key", dt, kv_width)
            _linear(sd, g, f"{layer}.{block}.self.value", dt, kv_width)
            _linear(sd, g, f"{layer}.{block}.output.dense", dt, dt)
            _layer_norm(sd, g, f"{layer}.{block}.output.LayerNorm", dt)
        _linear(sd, g, f"{layer}.intermediate.dense", s["text_ffn"], dt)
        _linear(sd, g, f"{layer}.output.dense", dt, s["text_ffn"])
        _layer_norm(sd, g, f"{layer}.output.LayerNorm", dt)
    _linear(sd, g, "blip.vision_proj", s["proj_dim"], dv)
    _linear(sd, g, "blip.text_proj", s["proj_dim"], dt)

    for idx, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, dt), (128, 1024), (64, 128), (16, 64), (1, 16))):
        _linear(sd, g, f"mlp.layers.{idx}", n_out, n_in)
    return sd


def tiny_med_config(**sizes) -> Dict:
    """BLIP's med_config.json keys, tiny sizes; ``encoder_width`` = the tiny ViT's width."""
    s = {**TINY_IMAGEREWARD, **sizes}
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": s["text_width"],
        "initializer_range": 0.02,
        "intermediate_size": s["text_ffn"],
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": s["max_positions"],
        "model_type": "bert",
        "num_attention_heads": s["text_heads"],
        "num_hidden_layers": s["text_layers"],
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(tiny_vocab()) + BLIP_ADDED_TOKENS,
        "encoder_width": s["vision_width"],
        "add_cross_attention": True,
    }


def save_tiny_bert_tokenizer(path: str) -> str:
    """A bert-base-uncased-style tokenizer directory: ``vocab.txt`` (one token a line) and
    ``tokenizer_config.json``."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(tiny_vocab()) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512}, f)
    return path


def save_tiny_imagereward(path: str, seed: int = 0, **sizes) -> str:
    """Write ``ImageReward.pt``, ``med_config.json`` and the tokenizer files into directory ``path``;
    returns the checkpoint path (the reward's defaults find the other two beside it)."""
    os.makedirs(path, exist_ok=True)
    ckpt = os.path.join(path, "ImageReward.pt")
    torch.save(tiny_imagereward_state_dict(seed=seed, **sizes), ckpt)
    with open(os.path.join(path, "med_config.json"), "w", encoding="utf-8") as f:
        json.dump(tiny_med_config(**sizes), f, indent=2)
    save_tiny_bert_tokenizer(path)
    return ckpt
