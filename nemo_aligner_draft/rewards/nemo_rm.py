"""``nemo_clip``: NeMo-Aligner's CLIP reward model ``.nemo`` (``rm.model.restore_from_path``), read natively.

NeMo-Aligner's DRaFT+ scores images with ``MegatronCLIPRewardModel`` (NeMo-Aligner
``nemo_aligner/models/mm/stable_diffusion/image_text_rms.py``): a NeMo *legacy* (non-megatron-core) CLIP,
i.e. ``CLIPVisionTransformer`` + ``CLIPTextTransformer`` of NeMo v2.1.0's ``megatron_clip_models.py``, and
a learned ``logit_scale``. Here the ``.nemo`` is opened without NeMo: its weights are mapped into a
transformers ``CLIPModel`` and the reward is computed the way NeMo-Aligner computes it, differentiably.

What NeMo-Aligner computes (``image_text_rms.py`` at NeMo-Aligner's final commit)
    - images: ``Resize(224, bicubic, antialias=True)`` (shortest edge) → ``CenterCrop(224)`` → ``× 1/255``
      → ``Normalize(OpenAI CLIP mean, std)`` (lines 81-98; the sampler hands it images in [0, 255],
      ``megatron_sd_draftp_model.py``: ``clip((x + 1) / 2, 0, 1) * 255``). Here images come in [0, 1]
      and the ×255 / ×1/255 pair cancels (the resize is linear). torchvision's tensor ``Resize`` does
      not clamp float images, so neither does this (unlike :class:`..preprocess.ClipPreprocess`, which
      follows PIL); its ``CenterCrop`` rounds an odd margin with ``round``.
    - prompts: NeMo's ``tokenize`` (NeMo ``nemo/collections/multimodal/data/clip/clip_dataset.py``
      lines 36-72): ``[bos] + ids + [eos]``, cut to the context length with the last token set to eos,
      padded to ``text.max_position_embeddings`` (line 91); the text feature is the token at
      ``input_ids.argmax(-1)`` (the eos, the highest id) after the final layer norm, times the head
      (``megatron_clip_models.py`` lines 302-306).
    - image feature: the class token (or the token mean with ``global_average_pool``) after the
      transformer's final layer norm, times the head (``megatron_clip_models.py`` lines 169-179).
    - reward: ``logit_scale.exp() · ⟨normalize(img), normalize(txt)⟩`` (``image_text_rms.py`` lines
      63-72: the diagonal of the image × text cosine matrix).

One deviation, by design: NeMo-Aligner resizes to a hard-coded 224 px; we resize to the model's own
``vision.img_h`` — the same for every 224-px CLIP (PickScore, ViT-H-14, ViT-L-14). For another size
NeMo's ViT would bicubically interpolate its position embeddings at run time, which we do not copy.

The ``.nemo`` layout (NeMo v2.1.0 ``nemo/core/connectors/save_restore_connector.py``): an uncompressed
tar of ``./model_config.yaml`` (the model config; a top-level ``model:`` node is unwrapped as NeMo does)
and ``./model_weights.ckpt`` (``torch.save`` of the LightningModule's state dict, keys under
``model.``). The fused attention projection ``self_attention.query_key_value`` ([3·H, H]) holds
``[q; k; v]`` blocks when the tower's ``megatron_legacy`` is true (NeMo's ``_transpose_last_dim``
regroups them per head at run time, ``attention.py`` lines 337-367, 426-438) and per-head ``[q_h, k_h,
v_h]`` groups otherwise.
"""
from __future__ import annotations

import functools
import os
import posixpath
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .base import Reward, _at_least_fp32, register_reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, center_crop, resized_shape

REWARD = "nemo_clip"
CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
EXPECTED = ("a NeMo-Aligner CLIP reward model .nemo (MegatronCLIPRewardModel: a tar of model_config.yaml with "
            "vision/text sections and model_weights.ckpt with model.vision_encoder.* / model.text_encoder.*)")
# NeMo-Aligner image_text_rms.py:81-82 (also NeMo's OPENAI_DATASET_MEAN/STD)
NEMO_ALIGNER_MEAN = OPENAI_CLIP_MEAN
NEMO_ALIGNER_STD = OPENAI_CLIP_STD
# Keys a NeMo CLIP state dict holds besides parameters: megatron-core's parallel linears save an empty
# ``_extra_state`` (None) "to keep compatibility with TE state dicts".
_EXTRA_STATE = "._extra_state"


# --------------------------------------------------------------------------- reading the archive
def _bad(path: str, message: str) -> ValueError:
    return ValueError(f"{path!r}: {message}; expected {EXPECTED}")


def _member_name(member: tarfile.TarInfo, path: str) -> str:
    """The member's normalised relative name (``./a/b`` → ``a/b``, ``.`` → ``""``); unsafe ones refused."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or os.path.isabs(member.name) or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"{path!r}: unsafe tar member {member.name!r} (absolute path); refusing to extract it")
    if ".." in name.split("/"):
        raise ValueError(f"{path!r}: unsafe tar member {member.name!r} ('..' leaves the archive's folder); "
                         f"refusing to extract it")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"{path!r}: unsafe tar member {member.name!r} (a link or special file); refusing to "
                         f"extract it")
    norm = posixpath.normpath(name)
    return "" if norm == "." else norm


def _pick_weights(files: Dict[str, tarfile.TarInfo], dirs: List[str], path: str) -> tarfile.TarInfo:
    if WEIGHTS_MEMBER in files:
        return files[WEIGHTS_MEMBER]
    dist_dir = WEIGHTS_MEMBER.rsplit(".", 1)[0]  # NeMo's ckpt_to_dir("model_weights.ckpt")
    if dist_dir in dirs or any(n.startswith(dist_dir + "/") for n in files):
        raise _bad(path, "its weights are a megatron-core distributed checkpoint (a model_weights/ folder), "
                         "which NeMo-Aligner's reward model never writes")
    shards = sorted(n for n in files if n.endswith("/" + WEIGHTS_MEMBER))
    if len(shards) == 1:  # mp_rank_00/ with tensor_model_parallel_size 1 and model_parallel_size > 1
        return files[shards[0]]
    if shards:
        raise _bad(path, f"its weights are split over {len(shards)} model-parallel ranks ({', '.join(shards[:4])}); "
                         f"re-save it with tensor/pipeline parallel size 1")
    raise _bad(path, f"the archive has no {WEIGHTS_MEMBER} (members: {sorted(files)[:8]})")


def _load_weights_file(file_path: str, path: str) -> dict:
    from ..errors import InputError
    from ..files import safe_torch_load

    try:
        state = safe_torch_load(file_path, what=f"{WEIGHTS_MEMBER} of {path}")
    except InputError as e:
        raise ValueError(f"{path!r}: {WEIGHTS_MEMBER} cannot be loaded: {e.message}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise _bad(path, f"{WEIGHTS_MEMBER} holds a {type(state).__name__}, not a state dict")
    return state


def _parse_config(text: str, path: str) -> dict:
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.create(text)
        if "model" in conf:  # a whole run config: NeMo restores its ``model`` node (save_restore_connector.py)
            conf = conf.model
        conf = OmegaConf.to_container(conf, resolve=True)
    except Exception as e:  # YAML syntax, an unresolvable ${...}
        raise _bad(path, f"{CONFIG_MEMBER} is not a readable config ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(conf, dict):
        raise _bad(path, f"{CONFIG_MEMBER} holds a {type(conf).__name__}, not a mapping")
    return conf


def read_nemo_archive(path: str) -> Tuple[dict, dict]:
    """(model config, state dict) of a ``.nemo`` tar (or of an unpacked ``.nemo`` folder).

    Every member is checked before anything is read: an absolute name, a ``..`` component, a link or a
    device refuses the whole archive. Only the config and the weights are extracted, into a private
    temporary folder under names of our own, and the weights are read with ``weights_only=True``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg_file, w_file = os.path.join(path, CONFIG_MEMBER), os.path.join(path, WEIGHTS_MEMBER)
        if not (os.path.isfile(cfg_file) and os.path.isfile(w_file)):
            raise _bad(path, f"the folder has no {CONFIG_MEMBER} and {WEIGHTS_MEMBER}")
        with open(cfg_file, encoding="utf-8") as f:
            config = _parse_config(f.read(), path)
        return config, _load_weights_file(w_file, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reward {REWARD!r}: {path!r} does not exist; expected {EXPECTED}")
    if not tarfile.is_tarfile(path):
        what = "a zip archive (a bare PyTorch checkpoint?)" if zipfile.is_zipfile(path) else "not a tar archive"
        raise ValueError(f"{path!r} is {what}; expected {EXPECTED}")
    try:
        tar = tarfile.open(path, "r:*")  # NeMo writes "w:" (uncompressed); NeMo < 1.7 wrote tar.gz
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path!r} is not a readable tar archive ({e}); expected {EXPECTED}") from None
    with tar:
        try:
            return _read_members(tar, path)
        except (tarfile.TarError, EOFError, zlib.error) as e:  # truncated or corrupt archive
            raise ValueError(f"{path!r} is a damaged tar archive ({type(e).__name__}: {e}); "
                             f"expected {EXPECTED}") from None


def _read_members(tar: tarfile.TarFile, path: str) -> Tuple[dict, dict]:
    files, dirs = {}, []
    for m in tar.getmembers():
        name = _member_name(m, path)
        if m.isdir():
            dirs.append(name)
        else:
            files[name] = m
    if CONFIG_MEMBER not in files:
        raise _bad(path, f"the archive has no {CONFIG_MEMBER} (members: {sorted(files)[:8]})")
    weights_member = _pick_weights(files, dirs, path)
    config = _parse_config(tar.extractfile(files[CONFIG_MEMBER]).read().decode("utf-8", "replace"), path)
    # Refuse a non-CLIP archive (a Stable Diffusion .nemo) before reading gigabytes of weights.
    check_clip_config(config, path)
    with tempfile.TemporaryDirectory(prefix="nemo_rm_") as tmp:
        w_file = os.path.join(tmp, WEIGHTS_MEMBER)
        src = tar.extractfile(weights_member)
        with open(w_file, "wb") as dst:
            while True:
                chunk = src.read(1 << 24)
                if not chunk:
                    break
                dst.write(chunk)
        weights = _load_weights_file(w_file, path)
    return config, weights


# --------------------------------------------------------------------------- the architecture
@dataclass(frozen=True)
class Tower:
    """One transformer tower as NeMo's config describes it."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    eps: float
    hidden_act: str  # the transformers name of NeMo's activation
    legacy_qkv: bool  # megatron_legacy: [q; k; v] blocks (else per-head groups)
    pos_param: bool  # learned_parameters (a bare Parameter) rather than learned_absolute (an Embedding)
    output_dim: int


@dataclass(frozen=True)
class NemoClipArch:
    vision: Tower
    text: Tower
    patch: int
    image_size: int
    channels: int
    preprocess_layernorm: bool
    global_average_pool: bool
    context: int
    tokenizer: dict
    vocab_multiple: int


_VISION_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "patch_dim", "img_h",
                  "img_w", "output_dim")
_TEXT_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings",
                "output_dim")


def check_clip_config(config: dict, path: str) -> None:
    """Refuse a config that is not a CLIP model's (e.g. a Stable Diffusion .nemo) in one line."""
    target = config.get("target")
    sections = {k: config.get(k) for k in ("vision", "text")}
    absent = [k for k, v in sections.items() if not isinstance(v, dict)]
    if absent:
        raise _bad(path, f"this .nemo is not a CLIP reward model: {CONFIG_MEMBER} (target {target!r}) has no "
                         f"{' / '.join(absent)} section")
    for key, fields in (("vision", _VISION_FIELDS), ("text", _TEXT_FIELDS)):
        missing = [f for f in fields if sections[key].get(f) is None]
        if missing:
            raise _bad(path, f"this .nemo is not a CLIP reward model: {CONFIG_MEMBER} (target {target!r}) "
                             f"{key} section lacks {', '.join(missing)}")


def _activation(sec: dict, which: str, path: str) -> str:
    """NeMo's MLP activation (nemo/collections/nlp/modules/common/megatron/mlp.py: openai_gelu first,
    then ``activation``; ``fused_bias_gelu`` is the tanh approximation) as a transformers name."""
    act = sec.get("activation", "gelu")
    if sec.get("openai_gelu", False):
        return "gelu_pytorch_tanh"
    if act == "gelu":
        return "gelu_pytorch_tanh" if sec.get("bias_activation_fusion", False) else "gelu"
    if act == "approx-gelu":
        return "quick_gelu"  # x · sigmoid(1.702 x)
    raise _bad(path, f"{which}.activation {act!r} is not supported (gelu, approx-gelu or openai_gelu)")


def _tower(sec: dict, which: str, path: str) -> Tower:
    hidden, heads = int(sec["hidden_size"]), int(sec["num_attention_heads"])
    if hidden % heads:
        raise _bad(path, f"{which}.hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    kv = sec.get("kv_channels")
    if kv is not None and int(kv) * heads != hidden:
        raise _bad(path, f"{which}.kv_channels {kv} × {heads} heads ≠ hidden_size {hidden}: not supported")
    norm = sec.get("normalization", "layernorm")
    if norm != "layernorm":
        raise _bad(path, f"{which}.normalization {norm!r} is not supported (layernorm)")
    pos = sec.get("position_embedding_type", "learned_absolute")
    if pos not in ("learned_absolute", "learned_parameters"):
        raise _bad(path, f"{which}.position_embedding_type {pos!r} is not supported "
                         f"(learned_absolute or learned_parameters)")
    if "megatron_legacy" not in sec:
        raise _bad(path, f"{which}.megatron_legacy is missing: the layout of the fused query_key_value "
                         f"weight cannot be told")
    return Tower(hidden=hidden, layers=int(sec["num_layers"]), heads=heads, ffn=int(sec["ffn_hidden_size"]),
                 eps=float(sec.get("layernorm_epsilon", 1e-5)), hidden_act=_activation(sec, which, path),
                 legacy_qkv=bool(sec["megatron_legacy"]), pos_param=pos == "learned_parameters",
                 output_dim=int(sec["output_dim"]))


def parse_arch(config: dict, path: str) -> NemoClipArch:
    check_clip_config(config, path)
    v, t = config["vision"], config["text"]
    vision, text = _tower(v, "vision", path), _tower(t, "text", path)
    if vision.output_dim != text.output_dim:
        raise _bad(path, f"vision.output_dim {vision.output_dim} ≠ text.output_dim {text.output_dim}")
    if int(v.get("class_token_length") or 0) != 1:
        raise _bad(path, f"vision.class_token_length {v.get('class_token_length')!r} is not supported (1, as in "
                         f"every CLIP)")
    if int(v["img_h"]) != int(v["img_w"]):
        raise _bad(path, f"vision image {v['img_h']}×{v['img_w']} is not square (NeMo-Aligner crops square)")
    if int(v["img_h"]) % int(v["patch_dim"]):
        raise _bad(path, f"vision.img_h {v['img_h']} is not a multiple of patch_dim {v['patch_dim']}")
    if v.get("layerscale", False):
        raise _bad(path, "vision.layerscale is not supported")
    tok = config.get("tokenizer") or {}
    multiple = int(config.get("make_vocab_size_divisible_by", 128)) * int(config.get("tensor_model_parallel_size", 1))
    return NemoClipArch(vision=vision, text=text, patch=int(v["patch_dim"]), image_size=int(v["img_h"]),
                        channels=int(v.get("num_channels", 3)), preprocess_layernorm=bool(v.get("preprocess_layernorm", False)),
                        global_average_pool=bool(v.get("global_average_pool", False)),
                        context=int(t["max_position_embeddings"]), tokenizer=dict(tok), vocab_multiple=multiple)


# --------------------------------------------------------------------------- NeMo names → transformers names
def split_fused_qkv(fused: torch.Tensor, heads: int, legacy: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NeMo's ``query_key_value`` weight ``[3·H, in]`` (or bias ``[3·H]``) → (q, k, v), each ``[H, ...]``.

    ``legacy`` (``megatron_legacy: True``): rows are ``[q (all heads); k; v]``; NeMo views the output as
    ``[3, heads, hn]`` and swaps the first two axes before splitting. Otherwise rows are grouped per head
    ``[q_0, k_0, v_0, q_1, ...]``: NeMo views ``[heads, 3·hn]`` and splits the last axis in three."""
    rest = fused.shape[1:]
    hn = fused.shape[0] // (3 * heads)
    if legacy:
        blocks = fused.reshape(3, heads, hn, *rest)
    else:
        blocks = fused.reshape(heads, 3, hn, *rest).transpose(0, 1)
    return tuple(b.reshape(heads * hn, *rest).contiguous() for b in blocks)


_LAYER_PLAIN = {
    "input_layernorm": "layer_norm1",
    "self_attention.dense": "self_attn.out_proj",
    "post_attention_layernorm": "layer_norm2",
    "mlp.dense_h_to_4h": "mlp.fc1",
    "mlp.dense_4h_to_h": "mlp.fc2",
}


class _Taker:
    """Takes NeMo tensors by name, checks their shapes, and reports what is left or missing."""

    def __init__(self, weights: Dict[str, torch.Tensor], prefix: str, path: str):
        self.left = {k: v for k, v in weights.items() if k.startswith(prefix) and not k.endswith(_EXTRA_STATE)}
        self.others = sorted(k for k in weights if not k.startswith(prefix) and not k.endswith(_EXTRA_STATE))
        self.prefix, self.path, self.missing = prefix, path, []

    def take(self, name: str, shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
        key = self.prefix + name
        t = self.left.pop(key, None)
        if t is None:
            self.missing.append(key)
            return None
        if not torch.is_tensor(t):
            raise _bad(self.path, f"{key} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(shape):
            raise _bad(self.path, f"tensor {key} has shape {tuple(t.shape)}, the config implies {tuple(shape)}")
        return t.detach().to(torch.float32)

    def finish(self) -> None:
        if self.missing:
            raise _bad(self.path, f"{len(self.missing)} tensor(s) the config implies are missing from "
                                  f"{WEIGHTS_MEMBER}: {', '.join(self.missing[:6])}")
        unmapped = sorted(self.left) + self.others
        if unmapped:
            raise _bad(self.path, f"{len(unmapped)} tensor(s) in {WEIGHTS_MEMBER} have no place in the CLIP reward "
                                  f"model: {', '.join(unmapped[:6])}")


def _map_layers(tk: _Taker, out: dict, nemo: str, hf: str, tw: Tower) -> None:
    h = tw.hidden
    shapes = {"input_layernorm": [(h,), (h,)], "self_attention.dense": [(h, h), (h,)],
              "post_attention_layernorm": [(h,), (h,)], "mlp.dense_h_to_4h": [(tw.ffn, h), (tw.ffn,)],
              "mlp.dense_4h_to_h": [(h, tw.ffn), (h,)]}
    for i in range(tw.layers):
        src, dst = f"{nemo}.{i}.", f"{hf}.{i}."
        for ours, theirs in _LAYER_PLAIN.items():
            for kind, shape in zip(("weight", "bias"), shapes[ours]):
                out[dst + f"{theirs}.{kind}"] = tk.take(src + f"{ours}.{kind}", shape)
        for kind, shape in (("weight", (3 * h, h)), ("bias", (3 * h,))):
            fused = tk.take(src + f"self_attention.query_key_value.{kind}", shape)
            if fused is not None:
                for proj, part in zip("qkv", split_fused_qkv(fused, tw.heads, tw.legacy_qkv)):
                    out[dst + f"self_attn.{proj}_proj.{kind}"] = part


def _state_prefix(weights: dict, path: str) -> str:
    for prefix in ("model.module.", "model.", ""):  # "model.module." if saved from an O2 wrapper by hand
        if any(k.startswith(prefix + "vision_encoder.") for k in weights) and \
                any(k.startswith(prefix + "text_encoder.") for k in weights):
            return prefix
    sample = ", ".join(sorted(weights)[:3])
    raise _bad(path, f"{WEIGHTS_MEMBER} holds no CLIP vision/text towers (no model.vision_encoder.* and "
                     f"model.text_encoder.* tensors; it has {len(weights)} entries such as {sample})")


def nemo_to_hf_state_dict(weights: Dict[str, torch.Tensor], arch: NemoClipArch, path: str = "<weights>") -> Dict[str, torch.Tensor]:
    """Map every tensor of NeMo's reward-model state dict to a transformers ``CLIPModel`` key.

    A tensor the config implies but the file lacks, one of the wrong shape, or one with no place in
    the model is a ``ValueError`` naming it; megatron-core's empty ``*._extra_state`` entries are skipped."""
    prefix = _state_prefix(weights, path)
    tk = _Taker(weights, prefix, path)
    v, t, out = arch.vision, arch.text, {}
    grid = arch.image_size // arch.patch
    # vision tower: VitBackbone (nemo/collections/vision/modules/vit/vit_backbone.py) + head
    vb = "vision_encoder.backbone."
    cls = tk.take(vb + "cls_token", (1, 1, v.hidden))
    out["vision_model.embeddings.class_embedding"] = None if cls is None else cls.reshape(v.hidden)
    out["vision_model.embeddings.patch_embedding.weight"] = tk.take(vb + "conv1.weight",
                                                                    (v.hidden, arch.channels, arch.patch, arch.patch))
    out["vision_model.embeddings.position_embedding.weight"] = tk.take(
        vb + ("position_embeddings" if v.pos_param else "position_embeddings.weight"), (grid * grid + 1, v.hidden))
    if arch.preprocess_layernorm:
        for kind in ("weight", "bias"):
            out[f"vision_model.pre_layrnorm.{kind}"] = tk.take(vb + f"preprocess_layernorm.{kind}", (v.hidden,))
    _map_layers(tk, out, vb + "transformer.layers", "vision_model.encoder.layers", v)
    for kind in ("weight", "bias"):
        out[f"vision_model.post_layernorm.{kind}"] = tk.take(vb + f"transformer.final_layernorm.{kind}", (v.hidden,))
    out["visual_projection.weight"] = tk.take("vision_encoder.head.weight", (v.output_dim, v.hidden))
    # text tower: TransformerLanguageModel (language_model.py) + head
    tl = "text_encoder.language_model."
    emb = tk.left.get(prefix + tl + "embedding.word_embeddings.weight")
    rows = int(emb.shape[0]) if torch.is_tensor(emb) and emb.ndim == 2 else 0
    out["text_model.embeddings.token_embedding.weight"] = tk.take(tl + "embedding.word_embeddings.weight",
                                                                  (rows, t.hidden))
    out["text_model.embeddings.position_embedding.weight"] = tk.take(
        tl + ("embedding.position_embeddings" if t.pos_param else "embedding.position_embeddings.weight"),
        (arch.context, t.hidden))
    _map_layers(tk, out, tl + "encoder.layers", "text_model.encoder.layers", t)
    for kind in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{kind}"] = tk.take(tl + f"encoder.final_layernorm.{kind}", (t.hidden,))
    out["text_projection.weight"] = tk.take("text_encoder.head.weight", (t.output_dim, t.hidden))
    out["logit_scale"] = tk.take("logit_scale", ())
    tk.finish()
    return out


def build_hf_clip(arch: NemoClipArch, hf_state: Dict[str, torch.Tensor], path: str = "<weights>"):
    """A transformers ``CLIPModel`` of ``arch`` holding exactly ``hf_state`` (built on the meta device:
    no random initialisation of a billion parameters that are overwritten anyway)."""
    from transformers import CLIPConfig, CLIPModel

    v, t = arch.vision, arch.text
    vocab = int(hf_state["text_model.embeddings.token_embedding.weight"].shape[0])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=t.hidden, intermediate_size=t.ffn, num_hidden_layers=t.layers,
                         num_attention_heads=t.heads, max_position_embeddings=arch.context, hidden_act=t.hidden_act,
                         layer_norm_eps=t.eps, attention_dropout=0.0, dropout=0.0, projection_dim=t.output_dim),
        vision_config=dict(hidden_size=v.hidden, intermediate_size=v.ffn, num_hidden_layers=v.layers,
                           num_attention_heads=v.heads, num_channels=arch.channels, image_size=arch.image_size,
                           patch_size=arch.patch, hidden_act=v.hidden_act, layer_norm_eps=v.eps,
                           attention_dropout=0.0, dropout=0.0, projection_dim=v.output_dim),
        projection_dim=v.output_dim, logit_scale_init_value=float(hf_state["logit_scale"]))
    with torch.device("meta"):
        model = CLIPModel(cfg)
    model = model.to_empty(device="cpu")
    if not arch.preprocess_layernorm:  # NeMo's ViT without preprocess_layernorm: nothing between embedding and layers
        model.vision_model.pre_layrnorm = torch.nn.Identity()
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(hf_state)), sorted(set(hf_state) - expected)
    if missing or extra:  # a mapping bug, not the user's file: say what differs
        raise RuntimeError(f"NeMo→CLIPModel mapping mismatch: missing {missing[:6]}, unexpected {extra[:6]}")
    model.load_state_dict(hf_state, strict=True)
    for name, buf in model.named_buffers():  # non-persistent buffers are not in the state dict
        if name not in expected:
            if not name.endswith("embeddings.position_ids"):
                raise RuntimeError(f"CLIPModel buffer {name!r} is not restored by the NeMo mapping")
            buf.copy_(torch.arange(buf.shape[-1], dtype=buf.dtype).expand_as(buf))
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- preprocessing and tokens
class NemoAlignerImagePreprocess(torch.nn.Module):
    """NeMo-Aligner's ``diff_preprocess`` on ``[B, 3, H, W]`` in [0, 1]: shortest edge → ``size`` (bicubic,
    antialiased, as torchvision's tensor ``Resize``: no clamping), ``CenterCrop(size)`` (torchvision's
    rounding), ``Normalize(mean, std)``. Differentiable."""

    def __init__(self, size: int, mean: Sequence[float] = NEMO_ALIGNER_MEAN, std: Sequence[float] = NEMO_ALIGNER_STD):
        super().__init__()
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        new = resized_shape(h, w, self.size, "shortest")
        x = images
        if new != (h, w):
            x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
        x = center_crop(x, (self.size, self.size), "round")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def nemo_tokenize(tokenizer, prompts: Sequence[str], context: int) -> torch.Tensor:
    """NeMo's CLIP ``tokenize`` (clip_dataset.py:36-72): ``[bos] + text_to_ids + [eos]``, truncated to
    ``context`` with the last token set to eos, padded with the pad id."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = torch.full((len(prompts), context), int(pad), dtype=torch.long)
    for i, text in enumerate(prompts):
        # NeMo's text_to_ids (tokenize + convert_tokens_to_ids); only the first ``context`` ids can survive
        # the cut, so no more are kept (and the tokenizer does not warn about over-long prompts)
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=context)["input_ids"]
        tokens = ([bos] if bos is not None else []) + list(ids) + [eos]
        if len(tokens) > context:
            tokens = tokens[:context]
            tokens[-1] = eos
        out[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


@functools.lru_cache(maxsize=1)
def _clip_bpe_tokenizer():
    """The 49,408-token CLIP BPE tokenizer (the one of openai/clip-* and laion/CLIP-*), built offline."""
    from transformers import CLIPTokenizer

    from ..embedded.tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="nemo_rm_tok_") as d:
        write_clip_tokenizer(d)
        return CLIPTokenizer.from_pretrained(d, local_files_only=True)


def load_tokenizer(arch: NemoClipArch, vocab_rows: int, path: str, tokenizer_path: Optional[str] = None):
    """``tokenizer_path`` (a Hugging Face tokenizer folder), else the built-in CLIP BPE tokenizer when the
    ``.nemo`` names a Hugging Face tokenizer whose padded size matches the text embedding."""
    if tokenizer_path:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(os.path.expanduser(tokenizer_path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward {REWARD!r}: tokenizer_path {tokenizer_path!r} is not a Hugging Face tokenizer "
                             f"folder: {str(e).splitlines()[0]}") from e
        if len(tok) > vocab_rows:
            raise ValueError(f"reward {REWARD!r}: tokenizer at {tokenizer_path!r} has {len(tok)} tokens but the text "
                             f"embedding of {path!r} has {vocab_rows} rows")
        return tok
    library = arch.tokenizer.get("library", "huggingface")
    if library != "huggingface":
        raise _bad(path, f"its tokenizer is {library!r} ({arch.tokenizer.get('type')!r}); only the CLIP BPE "
                         f"tokenizer is built in: pass tokenizer_path")
    tok = _clip_bpe_tokenizer()
    m = arch.vocab_multiple
    padded = ((len(tok) + m - 1) // m) * m  # NeMo's _vocab_size_with_padding
    if vocab_rows != padded:
        raise _bad(path, f"its text embedding has {vocab_rows} rows, not the CLIP tokenizer's {len(tok)} padded to "
                         f"{padded} (tokenizer {arch.tokenizer.get('type')!r}): pass tokenizer_path")
    return tok


# --------------------------------------------------------------------------- the reward
class NemoClipReward(Reward):
    """``logit_scale.exp() · cos(E_img(x), E_txt(prompt))`` of a NeMo-Aligner CLIP reward model, ``[B]``."""

    differentiable = True

    def __init__(self, model, tokenizer, preprocess: NemoAlignerImagePreprocess, context: int,
                 global_average_pool: bool = False, name: str = REWARD):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.context = int(context)
        self.global_average_pool = bool(global_average_pool)
        self.name = name

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return nemo_tokenize(self.tokenizer, list(prompts), self.context)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vm = self.model.vision_model
        pixels = self.preprocess(images).to(self.model.logit_scale.dtype)
        out = vm(pixel_values=pixels)
        if self.global_average_pool:  # NeMo: final layer norm on every token, then the mean
            feats = vm.post_layernorm(out.last_hidden_state).mean(dim=1)
        else:
            feats = out.pooler_output  # post_layernorm of the class token
        return self.model.visual_projection(feats)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.token_ids(prompts).to(self.model.logit_scale.device)
        hidden = self.model.text_model(input_ids=ids).last_hidden_state  # after the final layer norm
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), ids.argmax(dim=-1)]
        return self.model.text_projection(pooled)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if prompts is None or len(prompts) != images.shape[0]:
            n = "no" if prompts is None else len(prompts)
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {n} prompts")
        img = F.normalize(_at_least_fp32(self.encode_images(images)), dim=-1)
        txt = F.normalize(_at_least_fp32(self.encode_text(prompts)), dim=-1)
        return _at_least_fp32(self.model.logit_scale).exp() * (img * txt.to(img.dtype)).sum(dim=-1)


def load_nemo_reward_model(path: str, tokenizer_path: Optional[str] = None) -> NemoClipReward:
    """Read NeMo-Aligner's CLIP reward model ``.nemo`` at ``path`` into a :class:`NemoClipReward`.

    A file that is not a tar, or a ``.nemo`` of something else (a Stable Diffusion model), is a
    ``ValueError`` in one line saying what the file is and what was expected."""
    path = os.path.expanduser(os.fspath(path))
    config, weights = read_nemo_archive(path)
    arch = parse_arch(config, path)
    hf_state = nemo_to_hf_state_dict(weights, arch, path)
    del weights
    model = build_hf_clip(arch, hf_state, path)
    rows = int(hf_state["text_model.embeddings.token_embedding.weight"].shape[0])
    tokenizer = load_tokenizer(arch, rows, path, tokenizer_path)
    return NemoClipReward(model, tokenizer, NemoAlignerImagePreprocess(arch.image_size), arch.context,
                          arch.global_average_pool)


@register_reward(REWARD)
def nemo_clip(path: Optional[str] = None, tokenizer_path: Optional[str] = None, **kwargs) -> Reward:
    """NeMo-Aligner's CLIP (PickScore-style) reward model from its ``.nemo``; ``tokenizer_path`` only for a
    model whose tokenizer is not CLIP's BPE."""
    if kwargs:
        raise ValueError(f"reward {REWARD!r}: unknown arguments {sorted(kwargs)}")
    if not path:
        raise FileNotFoundError(f"reward {REWARD!r} needs the path to {EXPECTED} (rm.model.restore_from_path); none given")
    return load_nemo_reward_model(path, tokenizer_path=tokenizer_path)
