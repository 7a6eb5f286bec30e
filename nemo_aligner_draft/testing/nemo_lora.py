"""Tiny random NeMo-Aligner DRaFT+ LoRA checkpoints, written in NeMo's own on-disk layouts.

Everything here follows NeMo's code, not this package's converters (tests compare the two):

* Which modules carry an adapter — :func:`nemo_linear_wrappers` walks the module tree NeMo v2.1.0's
  ``UNetModel.__init__`` builds (nemo/collections/multimodal/modules/stable_diffusion/diffusionmodules/
  openaimodel.py: input blocks 731-811 — attention where ``ds in attention_resolutions``, ``ds *= 2``
  after each level but the last; middle block 821-865, always with a SpatialTransformer at ``.1``;
  output blocks 867-942, ``num_res_blocks + 1`` per level, ``ds //= 2`` after each level but the first)
  and lists every ``LinearWrapper`` of each
  BasicTransformerBlock (attention.py: ``to_q`` 297, ``to_k``/``to_v`` 285-286, ``to_out.0`` 299-301,
  ``ff.net.1.proj`` 106/129-130, ``ff.net.3`` 130), with the (in, out) features NeMo gives them.
* The adapter keys and factor shapes — ``<prefix><module>.adapter_layer.parallel_linear_adapter.
  linear_in.weight`` ``[r, in]`` and ``linear_out.weight`` ``[out, r]`` (parallel_adapters.py:91,
  212-243; adapter_mixins.py:249, 274), linear_in initialised by ``column_init_method`` (xavier:
  ``init.xavier_normal_``, normal: N(0, 0.2²); parallel_adapters.py:292-303), under
  ``model.model.diffusion_model.`` and, for the frozen reference of NeMo-Aligner's SD model,
  ``init_model.model.diffusion_model.`` (megatron_sd_draftp_model.py:58) with linear_out at its zero
  init.
* A PEFT ``.nemo`` — :func:`write_peft_nemo`: SaveRestoreConnector.save_to (save_restore_connector.py:
  44-86): ``model.to_config_file`` = ``OmegaConf.save(config=cfg, f=fout, resolve=True)``
  (nemo/core/classes/common.py:634-635) into ``model_config.yaml``, ``torch.save(model.state_dict())``
  into ``model_weights.ckpt`` (682-683; a PEFT model's state_dict is its adapters,
  nlp_adapter_mixins.py:446-451), then ``tarfile.open(filename, "w:")`` + ``tar.add(dir, arcname=".")``
  (588-592).
* A Lightning ``.ckpt`` — :func:`write_lightning_ckpt`: a LightningModule that, like ModelPT, calls
  ``self.save_hyperparameters("cfg")`` with an OmegaConf DictConfig (modelPT.py:133, after adding
  ``target``/``nemo_version``, 118-126, and ``set_struct(cfg, True)``) and whose ``state_dict()`` is the
  adapters, saved by Lightning's own ``Trainer.save_checkpoint`` (so ``hyper_parameters`` holds the
  DictConfig exactly as NeMo's checkpoints do).
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

ADAPTER = "parallel_linear_adapter"
POLICY = "model.model.diffusion_model."
REFERENCE = "init_model.model.diffusion_model."
TARGET = "nemo_aligner.models.mm.stable_diffusion.megatron_sd_draftp_model.MegatronSDDRaFTPModel"

# NeMo UNetModel arguments of the tiny UNet of :mod:`.tiny` (block_out_channels (32, 64), one layer per
# block, attention on the second level, cross-attention dim 32)
TINY_NEMO_UNET = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                      transformer_depth=1, context_dim=32)


def _block_linears(prefix: str, dim: int, context_dim: int, depth: int, gated_ff: bool = True):
    out = []
    for t in range(depth):
        b = f"{prefix}.transformer_blocks.{t}."
        for attn, kv_in in (("attn1", dim), ("attn2", context_dim)):  # attn1 is self-attention
            out += [(f"{b}{attn}.to_q", dim, dim), (f"{b}{attn}.to_k", kv_in, dim), (f"{b}{attn}.to_v", kv_in, dim),
                    (f"{b}{attn}.to_out.0", dim, dim)]
        inner = 4 * dim  # FeedForward mult=4
        if gated_ff:
            out.append((f"{b}ff.net.1.proj", dim, 2 * inner))  # GEGLU: LinearWrapper(dim_in, dim_out * 2)
        else:
            out.append((f"{b}ff.net.1.0", dim, inner))
        out.append((f"{b}ff.net.3", inner, dim))
    return out


def nemo_linear_wrappers(model_channels: int, channel_mult: Sequence[int], num_res_blocks: Union[int, Sequence[int]],
                         attention_resolutions: Sequence[int], transformer_depth: Union[int, Sequence[int]] = 1,
                         context_dim: int = 768, transformer_depth_middle: Optional[int] = None,
                         ) -> List[Tuple[str, int, int]]:
    """(NeMo module path, in_features, out_features) of every LinearWrapper of NeMo's UNetModel
    (spatial transformers with inner dim = channels, as ``num_heads · dim_head`` is)."""
    n = len(channel_mult)
    nrb = [num_res_blocks] * n if isinstance(num_res_blocks, int) else list(num_res_blocks)
    depth = [transformer_depth] * n if isinstance(transformer_depth, int) else list(transformer_depth)
    middle = transformer_depth_middle if transformer_depth_middle is not None else depth[-1]
    out: List[Tuple[str, int, int]] = []
    block, ds = 1, 1
    for level, mult in enumerate(channel_mult):
        ch = mult * model_channels
        for _ in range(nrb[level]):
            if ds in attention_resolutions:
                out += _block_linears(f"input_blocks.{block}.1", ch, context_dim, depth[level])
            block += 1
        if level != n - 1:
            block += 1  # the Downsample block
            ds *= 2
    out += _block_linears("middle_block.1", channel_mult[-1] * model_channels, context_dim, middle)
    block = 0
    for level in reversed(range(n)):
        ch = channel_mult[level] * model_channels
        for _ in range(nrb[level] + 1):
            if ds in attention_resolutions:
                out += _block_linears(f"output_blocks.{block}.1", ch, context_dim, depth[level])
            block += 1
        if level:
            ds //= 2
    return out


def _init(weight: torch.Tensor, method: str, gen: torch.Generator) -> torch.Tensor:
    import math

    if method == "xavier":  # init.xavier_normal_: std = sqrt(2 / (fan_in + fan_out))
        std = math.sqrt(2.0 / (weight.shape[0] + weight.shape[1]))
        return torch.randn(weight.shape, generator=gen) * std
    if method == "normal":  # init_method_normal(0.2)
        return torch.randn(weight.shape, generator=gen) * 0.2
    raise ValueError(method)


def nemo_adapter_state(linears: Sequence[Tuple[str, int, int]], rank: int = 4, seed: int = 0,
                       column_init_method: str = "xavier", with_reference: bool = True,
                       dtype: torch.dtype = torch.float32, trained_scale: float = 0.05) -> Dict[str, torch.Tensor]:
    """The adapter state dict of a DRaFT+ run after some training: the policy's linear_in at NeMo's init
    plus a trained offset and a trained (non-zero) linear_out; the reference's adapters (when
    ``with_reference``) at their init, linear_out zero."""
    gen = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = {}
    for prefix, trained in ((POLICY, True), *(((REFERENCE, False),) if with_reference else ())):
        for module, fin, fout in linears:
            a = _init(torch.empty(rank, fin), column_init_method, gen)
            b = torch.zeros(fout, rank)
            if trained:
                a = a + trained_scale * torch.randn(a.shape, generator=gen)
                b = trained_scale * torch.randn(b.shape, generator=gen)
            state[f"{prefix}{module}.adapter_layer.{ADAPTER}.linear_in.weight"] = a.to(dtype)
            state[f"{prefix}{module}.adapter_layer.{ADAPTER}.linear_out.weight"] = b.to(dtype)
    return state


def nemo_model_config(rank: int = 4, network_alpha: Optional[float] = None, column_init_method: str = "xavier",
                      unet: Optional[dict] = None):
    """The model cfg a NeMo-Aligner DRaFT+ model holds (a struct DictConfig): NeMo-Aligner's
    draftp_sd.yaml ``model.peft`` section, ``target`` and ``nemo_version`` as ModelPT adds them."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "precision": 16,
        "kl_coeff": 0.1,
        "truncation_steps": 1,
        "unet_config": {"_target_": "nemo.collections.multimodal.modules.stable_diffusion.diffusionmodules."
                                    "openaimodel.UNetModel", "from_pretrained": None, "from_NeMo": True,
                        "lora_network_alpha": None, **(unet or TINY_NEMO_UNET)},
        "optim": {"name": "fused_adam", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999]},
        "peft": {"peft_scheme": "sdlora", "restore_from_path": None,
                 "lora_tuning": {"adapter_dim": rank, "adapter_dropout": 0.0, "column_init_method": column_init_method,
                                 "row_init_method": "zero", "layer_selection": None, "weight_tying": False,
                                 "position_embedding_strategy": None, "network_alpha": network_alpha}},
        "target": TARGET,
        "nemo_version": "2.1.0",
    })
    OmegaConf.set_struct(cfg, True)
    return cfg


def write_peft_nemo(path: str, state: Dict[str, torch.Tensor], cfg) -> str:
    """``path`` (a ``.nemo``) as NeMo's SaveRestoreConnector.save_to writes a PEFT model."""
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as tmpdir:
        with open(os.path.join(tmpdir, "model_config.yaml"), "w", encoding="utf-8") as fout:
            OmegaConf.save(config=cfg, f=fout, resolve=True)
        torch.save(state, os.path.join(tmpdir, "model_weights.ckpt"))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with tarfile.open(path, "w:") as tar:
            tar.add(tmpdir, arcname=".")
    return path


def write_lightning_ckpt(path: str, state: Dict[str, torch.Tensor], cfg) -> str:
    """``path`` (a ``.ckpt``) as Lightning saves a NeMo ModelPT whose state_dict is its adapters."""
    import lightning.pytorch as pl

    class _PeftModel(pl.LightningModule):
        def __init__(self, cfg):
            super().__init__()
            self._cfg = cfg
            self.save_hyperparameters("cfg")
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def state_dict(self, *args, **kwargs):  # NLPAdapterModelMixin.state_dict with use_peft
            return dict(state)

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=0)
    trainer.strategy.connect(_PeftModel(cfg))
    trainer.save_checkpoint(path)
    return path
