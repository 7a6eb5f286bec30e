"""A tiny random NeMo-Aligner CLIP reward model ``.nemo``, written in the layout NeMo v2.1.0 writes.

Sources read (bare clones; no code copied):

- NeMo-Aligner, final commit af2b3bd96ad78190f6ebfb552b9e599e313ce027:
  ``nemo_aligner/models/mm/stable_diffusion/image_text_rms.py`` (``MegatronCLIPRewardModel`` whose
  ``self.model`` is ``PickscoreRewardModel``: ``vision_encoder``, ``text_encoder``, ``logit_scale``),
  ``examples/mm/clip/conf/baseline.yaml`` (the ``model:`` section this config follows, tiny sizes),
  ``examples/mm/clip/train_reward_model.py``.
- NeMo, tag v2.1.0:
  ``nemo/core/connectors/save_restore_connector.py`` (``_model_config_yaml = "model_config.yaml"``,
  ``_model_weights_ckpt = "model_weights.ckpt"``; ``tarfile.open(filename, "w:")`` then
  ``tar.add(source_dir, arcname=".")`` → members ``.``, ``./model_config.yaml``, ``./model_weights.ckpt``;
  ``torch.save(model.state_dict(), ...)``),
  ``nemo/core/classes/modelPT.py`` (the config gets ``target`` and ``nemo_version``; a ``model`` node
  inside it is forbidden) and ``nemo/core/classes/common.py`` (``OmegaConf.save(..., resolve=True)``),
  ``nemo/collections/multimodal/models/vision_language_foundation/clip/megatron_clip_models.py``
  (``CLIPVisionTransformer``: ``backbone`` + ``head`` Linear without bias; ``CLIPTextTransformer``:
  ``language_model`` + ``head``),
  ``nemo/collections/vision/modules/vit/vit_backbone.py`` (``cls_token`` [1, class_token_length, H],
  ``conv1`` without bias, ``position_embeddings`` a Parameter for ``learned_parameters``,
  ``preprocess_layernorm``, ``transformer``),
  ``nemo/collections/nlp/modules/common/megatron/language_model.py`` (``embedding.word_embeddings``,
  ``embedding.position_embeddings``, ``encoder``), ``transformer.py`` (``layers.{i}.input_layernorm``,
  ``self_attention``, ``post_attention_layernorm``, ``mlp``, ``final_layernorm``), ``attention.py``
  (``query_key_value`` [3·H, H], ``dense``; with ``megatron_legacy`` the rows are [q; k; v] blocks,
  lines 337-367 and 426-438), ``mlp.py`` (``dense_h_to_4h``, ``dense_4h_to_h``),
  ``megatron_base_model.py`` (``_vocab_size_with_padding``: 49,408 padded to a multiple of 128),
  ``examples/multimodal/vision_language_foundation/clip/convert_external_clip_to_nemo.py`` (HF/open_clip →
  these names; q, k, v concatenated along dim 0 for these ``megatron_legacy: True`` configs).

Not in either repository: megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` define
``get_extra_state() -> None`` ("keep compatibility with TE state dict"), so torch's ``state_dict`` holds a
``<linear>._extra_state`` entry set to ``None`` for each of them; those entries are written here too.
"""
from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import torch

TARGET = "nemo_aligner.models.mm.stable_diffusion.image_text_rms.MegatronCLIPRewardModel"
NEMO_VERSION = "2.1.0"
TINY_NEMO_RM = dict(hidden=32, layers=2, heads=4, ffn=64, image=32, patch=8, context=77, output_dim=16)


def _tower_common(hidden: int, layers: int, heads: int, ffn: int) -> dict:
    """The architecture/precision keys both towers of baseline.yaml carry."""
    return {
        "num_layers": layers, "hidden_size": hidden, "ffn_hidden_size": ffn, "num_attention_heads": heads,
        "init_method_std": 0.02, "use_scaled_init_method": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "kv_channels": None, "apply_query_key_layer_scaling": True, "normalization": "layernorm",
        "layernorm_epsilon": 1e-5, "do_layer_norm_weight_decay": False, "pre_process": True, "post_process": True,
        "persist_layer_norm": True, "activations_checkpoint_granularity": None,
        "activations_checkpoint_method": None, "activations_checkpoint_num_layers": None,
    }


def tiny_nemo_rm_config(megatron_legacy: bool = True, output_dim: int = TINY_NEMO_RM["output_dim"]) -> dict:
    """The ``model_config.yaml`` content: NeMo-Aligner's baseline.yaml ``model:`` section resolved, tiny."""
    s = TINY_NEMO_RM
    num_patches = (s["image"] // s["patch"]) ** 2
    tail = {"native_amp_init_scale": 4294967296, "native_amp_growth_interval": 1000, "hysteresis": 2,
            "fp32_residual_connection": False, "fp16_lm_cross_entropy": False, "masked_softmax_fusion": True,
            "bias_dropout_add_fusion": True, "use_cpu_initialization": False, "onnx_safe": False,
            "gradient_accumulation_fusion": False, "openai_gelu": False, "bias_activation_fusion": False,
            "megatron_legacy": megatron_legacy}
    vision = {"precision": 32, "patch_dim": s["patch"], "img_h": s["image"], "img_w": s["image"], "image_mean": None,
              "image_std": None, "num_channels": 3, "drop_patch_rate": 0.0, "drop_path_rate": 0.0,
              "global_average_pool": False, "output_dim": output_dim, "class_token_length": 1,
              "preprocess_layernorm": True, "freeze": False, "encoder_seq_length": num_patches,
              "max_position_embeddings": num_patches, "position_embedding_type": "learned_parameters"}
    vision.update(_tower_common(s["hidden"], s["layers"], s["heads"], s["ffn"]))
    vision["sequence_parallel"] = False
    vision.update(tail)
    vision["activation"] = "gelu"
    text = {"precision": 32, "output_dim": output_dim, "freeze": False, "encoder_seq_length": s["context"],
            "max_position_embeddings": s["context"], "position_embedding_type": "learned_parameters"}
    text.update(_tower_common(s["hidden"], s["layers"], s["heads"], s["ffn"]))
    text.update({"num_micro_batches_with_partial_activation_checkpoints": None,
                 "activations_checkpoint_layers_per_pipeline": None, "sequence_parallel": False})
    text.update(tail)
    text.update({"transformer_engine": False, "fp8": False, "fp8_e4m3": False, "fp8_hybrid": False, "fp8_margin": 0,
                 "fp8_interval": 1, "fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent",
                 "use_emha": False, "activation": "gelu"})
    return {
        "precision": 32, "micro_batch_size": 2, "global_batch_size": 2, "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None, "from_pretrained": None,
        "output_dim": output_dim, "local_loss": False, "gather_with_grad": True, "vision": vision, "text": text,
        "megatron_amp_O2": False, "grad_allreduce_chunk_size_mb": 125, "grad_div_ar_fusion": True, "seed": 1234,
        "resume_from_checkpoint": None, "apex_transformer_log_level": 30, "gradient_as_bucket_view": True,
        "tokenizer": {"library": "huggingface", "type": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "model": None,
                      "vocab_file": None, "merge_file": None, "delimiter": None, "sentencepiece_legacy": False},
        "make_vocab_size_divisible_by": 128,
        "data": {"num_workers": 8, "data_path": "/path/to/dataset", "no_crop_images": True,
                 "train": {"drop_last": True}, "val": {"drop_last": True}},
        "nsys_profile": {"enabled": False, "start_step": 10, "end_step": 10, "ranks": [0], "gen_shape": False},
        "optim": {"name": "fused_adam", "lr": 3e-6, "weight_decay": 0.01, "betas": [0.9, 0.999],
                  "sched": {"name": "PolynomialDecayAnnealing", "warmup_steps": 500, "power": 1.0, "min_lr": 0}},
        "target": TARGET,
        "nemo_version": NEMO_VERSION,
    }


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_parallel: int = 1) -> int:
    multiple = divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple


class _Init:
    """Seeded random tensors, scaled so that every tensor visibly moves the score."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=self.g)

    def linear(self, out_f, in_f):
        return self.normal(out_f, in_f, std=1.0 / np.sqrt(in_f))

    def norm(self, n):
        return self.normal(n, std=0.1, mean=1.0), self.normal(n, std=0.1)


def _layer(sd, init: _Init, prefix: str, hidden: int, ffn: int) -> None:
    """One ParallelTransformerLayer's state dict entries, in module registration order."""
    w, b = init.norm(hidden)
    sd[prefix + "input_layernorm.weight"], sd[prefix + "input_layernorm.bias"] = w, b
    sd[prefix + "self_attention.query_key_value.weight"] = init.linear(3 * hidden, hidden)
    sd[prefix + "self_attention.query_key_value.bias"] = init.normal(3 * hidden, std=0.1)
    sd[prefix + "self_attention.query_key_value._extra_state"] = None
    sd[prefix + "self_attention.dense.weight"] = init.linear(hidden, hidden)
    sd[prefix + "self_attention.dense.bias"] = init.normal(hidden, std=0.1)
    sd[prefix + "self_attention.dense._extra_state"] = None
    w, b = init.norm(hidden)
    sd[prefix + "post_attention_layernorm.weight"], sd[prefix + "post_attention_layernorm.bias"] = w, b
    sd[prefix + "mlp.dense_h_to_4h.weight"] = init.linear(ffn, hidden)
    sd[prefix + "mlp.dense_h_to_4h.bias"] = init.normal(ffn, std=0.1)
    sd[prefix + "mlp.dense_h_to_4h._extra_state"] = None
    sd[prefix + "mlp.dense_4h_to_h.weight"] = init.linear(hidden, ffn)
    sd[prefix + "mlp.dense_4h_to_h.bias"] = init.normal(hidden, std=0.1)
    sd[prefix + "mlp.dense_4h_to_h._extra_state"] = None


def tiny_nemo_rm_state_dict(config: dict, seed: int = 0, vocab_size: int = 49408) -> "collections.OrderedDict[str, torch.Tensor]":
    """``MegatronCLIPRewardModel.state_dict()`` for ``config``: keys under ``model.`` (its ``self.model``);
    a module's own parameters come before its children's, as torch orders them."""
    init = _Init(seed)
    v, t = config["vision"], config["text"]
    hv, ht, d = v["hidden_size"], t["hidden_size"], config["output_dim"]
    seq = (v["img_h"] // v["patch_dim"]) * (v["img_w"] // v["patch_dim"]) + v["class_token_length"]
    vocab = padded_vocab_size(vocab_size, config["make_vocab_size_divisible_by"], config["tensor_model_parallel_size"])
    sd = collections.OrderedDict()
    sd["model.logit_scale"] = torch.tensor(float(np.log(1 / 0.07)))  # PickscoreRewardModel's initial value
    vb = "model.vision_encoder.backbone."
    sd[vb + "cls_token"] = init.normal(1, v["class_token_length"], hv, std=0.5)
    sd[vb + "position_embeddings"] = init.normal(seq, hv, std=0.5)
    sd[vb + "conv1.weight"] = init.normal(hv, v["num_channels"], v["patch_dim"], v["patch_dim"],
                                          std=1.0 / np.sqrt(v["num_channels"] * v["patch_dim"] ** 2))
    w, b = init.norm(hv)
    sd[vb + "preprocess_layernorm.weight"], sd[vb + "preprocess_layernorm.bias"] = w, b
    for i in range(v["num_layers"]):
        _layer(sd, init, f"{vb}transformer.layers.{i}.", hv, v["ffn_hidden_size"])
    w, b = init.norm(hv)
    sd[vb + "transformer.final_layernorm.weight"], sd[vb + "transformer.final_layernorm.bias"] = w, b
    sd["model.vision_encoder.head.weight"] = init.linear(d, hv)
    tl = "model.text_encoder.language_model."
    sd[tl + "embedding.position_embeddings"] = init.normal(t["max_position_embeddings"], ht, std=0.5)
    sd[tl + "embedding.word_embeddings.weight"] = init.normal(vocab, ht, std=0.5)
    for i in range(t["num_layers"]):
        _layer(sd, init, f"{tl}encoder.layers.{i}.", ht, t["ffn_hidden_size"])
    w, b = init.norm(ht)
    sd[tl + "encoder.final_layernorm.weight"], sd[tl + "encoder.final_layernorm.bias"] = w, b
    sd["model.text_encoder.head.weight"] = init.linear(d, ht)
    return sd


def write_nemo(path: str, config: dict, state_dict: dict) -> str:
    """Pack ``config`` and ``state_dict`` as NeMo's SaveRestoreConnector does: both files in a folder,
    ``tarfile.open(path, "w:")``, ``tar.add(folder, arcname=".")``."""
    import tarfile

    from omegaconf import OmegaConf

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "model_config.yaml"), "w", encoding="utf-8") as f:
            OmegaConf.save(config=OmegaConf.create(config), f=f, resolve=True)
        torch.save(state_dict, os.path.join(folder, "model_weights.ckpt"))
        with tarfile.open(path, "w:") as tar:
            tar.add(folder, arcname=".")
    return path


def save_tiny_nemo_reward_model(path: str, seed: int = 0, megatron_legacy: bool = True) -> str:
    """Write a tiny random CLIP reward model ``.nemo`` at ``path`` (hidden 32, 2 layers, 4 heads, 32-px images
    in 8-px patches, 77 text positions over the real 49,408-token CLIP vocabulary); returns ``path``.
    ``megatron_legacy`` picks the fused q/k/v layout: [q; k; v] blocks (True, as baseline.yaml) or
    per-head groups (False)."""
    from .tiny import clip_tokenizer

    config = tiny_nemo_rm_config(megatron_legacy=megatron_legacy)
    state = tiny_nemo_rm_state_dict(config, seed=seed, vocab_size=len(clip_tokenizer()))
    return write_nemo(path, config, state)
