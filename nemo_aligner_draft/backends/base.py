"""The interface every objective talks to: one :class:`DiffusionBackend` per model family.

A backend owns a family's diffusers modules and answers a handful of verbs: ``encode_prompts``
(prompts → :class:`Conditioning`), ``denoiser`` (a classifier-free-guided call of the denoising network,
the form :mod:`..core.sampler` drives), ``reference_denoiser``, ``decode``, ``step_rule``,
``initial_latents`` and the adapter verbs (``add_lora``, ``setup_reference``, ``trainable_parameters``).

What a family implements (``sd.py``, ``sdxl.py``): loading from a pipeline directory, ``_encode`` /
``_encode_uncond`` (prompts → the network's conditioning keyword arguments) and, where its network is
not a UNet called as ``net(sample=, timestep=, **conditioning)``, ``_net_call``. Everything else here is
shared: CFG, the reference view, LoRA insertion, decoding, latent shapes. Which families exist, and how a
pipeline directory is recognised, is the registry's business (:mod:`.registry`), not this module's.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..core.precision import autocast_off
from ..core.reference import ReferenceModel
from ..core.schedulers import StepRule, build_step_rule


@dataclass
class Conditioning:
    """The network's keyword arguments for the prompts (``cond``) and for the empty prompt (``uncond``),
    each a dict of tensors (or nested dicts of tensors) with the batch on dim 0, e.g.
    ``{"encoder_hidden_states": [B, L, D]}`` (plus ``added_cond_kwargs`` for SDXL)."""

    cond: Dict
    uncond: Dict

    @property
    def batch_size(self) -> int:
        return int(_first_tensor(self.cond).shape[0])


def _first_tensor(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            t = _first_tensor(v)
            if t is not None:
                return t
        return None
    return tree


def _cat(a, b):
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b], dim=0)


def _expand(tree, batch: int):
    if isinstance(tree, dict):
        return {k: _expand(v, batch) for k, v in tree.items()}
    return tree.expand(batch, *tree.shape[1:])


# diffusers VAE classes a pipeline's ``vae/`` may hold: SD's KL autoencoder, or the norm-free
# ``AutoencoderTiny`` (TAESD architecture; the embedded shapes model ships one). Both decode with
# ``vae.decode(z / scaling_factor).sample`` into [−1, 1] and downsample by 8.
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def load_vae(path: str, subfolder: Optional[str] = "vae", **kwargs):
    """The VAE of a local diffusers pipeline directory, of the class its ``config.json`` names."""
    import diffusers

    config = os.path.join(path, subfolder or "", "config.json")
    try:
        with open(config) as f:
            name = json.load(f).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"VAE config {config!r} is missing or not JSON ({e})") from None
    if name not in VAE_CLASSES:
        raise ValueError(f"{config}: _class_name {name!r} is not a supported VAE (expected one of {list(VAE_CLASSES)})")
    return getattr(diffusers, name).from_pretrained(path, subfolder=subfolder, local_files_only=True, **kwargs)


def check_pipeline_dir(path: str) -> dict:
    """``model_index.json`` of a local diffusers pipeline directory, or a FileNotFoundError naming the path."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory (expected a local diffusers pipeline directory "
                                f"with model_index.json)")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path!r} has no model_index.json (expected a diffusers pipeline directory "
                                f"saved with save_pretrained)")
    with open(index) as f:
        return json.load(f)


def lora_config(rank: int, alpha: Optional[float], target_modules: Sequence[str]):
    """The peft ``LoraConfig`` of every LoRA adapter the package builds. Training, export (which rebuilds
    a run's adapter to load its weights) and import share it, so an adapter means the same everywhere.

    ``alpha`` is NeMo's ``model.peft.lora_tuning.network_alpha``. NeMo scales the adapter output by
    ``network_alpha / adapter_dim`` when network_alpha is set and by 1 when it is null (or 0): NeMo v2.1.0
    ``LinearWrapper.forward``, nemo/collections/multimodal/modules/stable_diffusion/attention.py:235-238
    (the ParallelLinearAdapter's own ``alpha`` is never set by SDLoraPEFTConfig, so its factor
    ``alpha / dim`` is 1: parallel_adapters.py:187, 358). peft scales by ``lora_alpha / r``, so null
    becomes ``lora_alpha = r``."""
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    lora_alpha = float(alpha) if alpha else float(rank)
    return LoraConfig(r=int(rank), lora_alpha=lora_alpha, target_modules=list(target_modules),
                      init_lora_weights=True)


# NeMo's ParallelLinearAdapter initialisers (``_get_init_fn``, NeMo v2.1.0
# nemo/collections/nlp/modules/common/megatron/adapters/parallel_adapters.py:292-303): ``column_init_method``
# initialises linear_in (peft's lora_A, [r, in]), ``row_init_method`` linear_out (lora_B, [out, r]).
NEMO_INIT_METHODS = ("xavier", "normal", "kaiming", "zero")


def nemo_adapter_init_(weight: torch.Tensor, method: str) -> torch.Tensor:
    """Initialise one adapter factor in place as NeMo's ``init_method`` of that name does."""
    import math

    if method == "xavier":
        return torch.nn.init.xavier_normal_(weight)
    if method == "normal":
        return torch.nn.init.normal_(weight, mean=0.0, std=0.2)  # init_method_normal(0.2)
    if method == "kaiming":
        return torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if method == "zero":
        return torch.nn.init.constant_(weight, 0.0)
    raise ValueError(f"LoRA init method must be one of {list(NEMO_INIT_METHODS)} (NeMo's "
                     f"column_init_method/row_init_method), got {method!r}")


class DiffusionBackend:
    """A family's modules behind the shared verbs. ``net`` is the denoising network (a UNet, or a
    transformer for later families): the module the adapters go into and the optimizer trains."""

    family = "base"
    default_sampler = "ddim"
    #: the sampler's checkpointed steps return gradients to the network's parameters themselves (one
    #: autograd node per step, core/sampler.py); False where they are sharded (trainer.strategy=fsdp)
    exact_step_checkpoint = True

    def __init__(self, net, vae, text_encoders: Sequence, tokenizers: Sequence, scheduler,
                 frozen_dtype: torch.dtype = torch.float32):
        self.net = net
        self.vae = vae
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler = scheduler
        self.frozen_dtype = frozen_dtype
        self._uncond_cache: Optional[Dict] = None
        self.reference_model: Optional[ReferenceModel] = None
        for m in [net, vae, *self.text_encoders]:
            m.requires_grad_(False)
            m.eval()
        # The VAE encoder is never used by reward fine-tuning: do not keep it in memory.
        if getattr(self.vae, "encoder", None) is not None:
            self.vae.encoder = None
        for m in self.text_encoders:
            m.to(dtype=frozen_dtype)
        self.vae.to(dtype=self._vae_dtype(frozen_dtype))

    def _vae_dtype(self, frozen_dtype: torch.dtype) -> torch.dtype:
        """dtype the VAE is stored and run in (a family may keep it in fp32)."""
        return frozen_dtype

    # ----------------------------------------------------------------- what a family implements
    def _encode(self, prompts: List[str]) -> Dict:
        """Prompts → the network's conditioning keyword arguments, batch on dim 0."""
        raise NotImplementedError

    def _encode_uncond(self) -> Dict:
        """Conditioning of the unconditional branch for one sample (default: the empty prompt's)."""
        return self._encode([""])

    def _net_call(self, net, x: torch.Tensor, t: torch.Tensor, conditioning: Dict) -> torch.Tensor:
        """One call of the denoising network; UNets take ``sample``/``timestep`` and the conditioning."""
        return net(sample=x, timestep=t, **conditioning).sample

    def set_resolution(self, height: int, width: int, original=None, crop=(0, 0)) -> None:
        """Families whose conditioning depends on the output size (SDXL's time ids) override this."""

    # ----------------------------------------------------------------- prompts
    def _tokenize(self, tokenizer, prompts: List[str]) -> torch.Tensor:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        cond = self._encode(prompts)
        if self._uncond_cache is None:
            self._uncond_cache = self._encode_uncond()
        return Conditioning(cond=cond, uncond=_expand(self._uncond_cache, len(prompts)))

    # ----------------------------------------------------------------- the network
    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def latent_channels(self) -> int:
        return int(self.net.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def denoiser(self, cond: Conditioning, guidance_scale: float, net=None):
        """A :data:`~..core.sampler.Denoiser` with classifier-free guidance:
        out = out_u + w·(out_c − out_u), one batched network call for both halves.

        The callable carries ``grad_tensors`` (see :func:`~..core.sampler.denoiser_grad_tensors`): the
        network's parameters and the conditioning tensors that require grad, listed when sampling
        starts, so that the sampler's checkpointing records one autograd node per step. A backend whose
        parameters are not plain tensors the gradient can be returned to (FSDP's sharded DTensors, whose
        gradients must pass through FSDP's own hooks) sets ``exact_step_checkpoint = False`` on itself:
        the attribute is then left off and the sampler uses torch's checkpoint."""
        from ..core.sampler import tensors_requiring_grad

        net = net if net is not None else self.net
        w = float(guidance_scale)
        conditioning = cond.cond if w == 1.0 else _cat(cond.uncond, cond.cond)

        def fn(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if w == 1.0:
                return self._net_call(net, x_in, t, conditioning)
            t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t  # per-sample steps (DDPO)
            out_u, out_c = self._net_call(net, torch.cat([x_in, x_in]), t2, conditioning).chunk(2)
            return out_u + w * (out_c - out_u)

        if self.exact_step_checkpoint:
            fn.grad_tensors = lambda: tensors_requiring_grad(net.parameters(), conditioning)
        return fn

    def reference_denoiser(self, cond: Conditioning, guidance_scale: float):
        """The frozen reference's denoiser (adapters off, or the frozen copy). Always under no_grad."""
        if self.reference_model is None:
            raise RuntimeError("no reference model: call backend.setup_reference() first")
        ref = self.reference_model

        def fn(x_in, t):  # no grad_tensors: never differentiated, never checkpointed
            with ref.view() as net:
                return self.denoiser(cond, guidance_scale, net=net)(x_in, t)

        return fn

    def setup_reference(self, use_adapters: bool) -> ReferenceModel:
        self.reference_model = ReferenceModel(self.net, use_adapters=use_adapters)
        return self.reference_model

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute the network blocks' activations in backward instead of storing them (diffusers'
        gradient checkpointing); only active while autograd records, so no_grad steps cost nothing."""
        if on:
            self.net.enable_gradient_checkpointing()
        else:
            self.net.disable_gradient_checkpointing()

    def check_guidance_scale(self, guidance_scale: float) -> None:
        """Refuse a guidance scale the model cannot use (FLUX without a guidance embedding: only 1.0)."""

    def step_rule(self, num_steps: int, sampler: Optional[str] = None) -> StepRule:
        sampler = sampler or self.default_sampler
        if (sampler == "flow") != (self.default_sampler == "flow"):
            raise ValueError(f"sampler {sampler!r} does not fit the {self.family!r} model family "
                             f"({'a flow-matching model: use flow' if self.default_sampler == 'flow' else 'a noise-prediction model: use ddim or euler; flow is for sd3 and flux'})")
        return build_step_rule(self.scheduler, num_steps, sampler)

    def initial_latents(self, batch: int, height: int, width: int, rule: StepRule,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        return x.to(self.device) * rule.init_noise_sigma()

    # ----------------------------------------------------------------- VAE
    def decode(self, latents: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` → images ``[B, 3, H, W]`` in [0, 1], differentiable."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        z = z.to(self.vae.dtype)  # frozen_dtype, or fp32 where a family keeps the VAE upcast
        chunks = z.split(batch_size or z.shape[0])
        # a VAE kept in fp32 under a lower-precision run (force_upcast) decodes in fp32: autocast would
        # otherwise run its convolutions in bf16/fp16 all the same
        upcast = self.vae.dtype == torch.float32 and self.frozen_dtype != torch.float32
        with autocast_off() if upcast else contextlib.nullcontext():
            images = torch.cat([self.vae.decode(c).sample for c in chunks])
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------- adapters
    def add_lora(self, rank: int, alpha: Optional[float], target_modules: Sequence[str],
                 column_init_method: str = "normal", row_init_method: str = "zero",
                 dropout: float = 0.0) -> List[torch.nn.Parameter]:
        """Insert LoRA adapters into ``net`` as NeMo's SDLoraPEFTConfig does; returns the adapter
        parameters, kept in fp32.

        Initialisation is NeMo's, not peft's: lora_A (linear_in) by ``column_init_method`` and lora_B
        (linear_out) by ``row_init_method``, with SDLoraPEFTConfig's defaults ``"normal"`` (N(0, 0.2²))
        and ``"zero"`` (NeMo v2.1.0 nemo/collections/nlp/parts/peft_config.py:404-405; NeMo-Aligner's
        draftp_sd.yaml sets ``column_init_method: xavier``). With lora_B = 0 the policy starts equal to the
        reference. ``alpha``: NeMo's network_alpha, None meaning no scaling (see :func:`lora_config`).

        ``dropout``: NeMo's ``adapter_dropout``, applied where NeMo applies it — to the adapter's output
        (``dropout_position='post'``, the ParallelLinearAdapterConfig default SDLoraPEFTConfig keeps;
        parallel_adapters.py:355-356), not to its input as peft's ``lora_dropout`` would."""
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        for method in (column_init_method, row_init_method):
            if method not in NEMO_INIT_METHODS:
                raise ValueError(f"LoRA init method must be one of {list(NEMO_INIT_METHODS)} (NeMo's "
                                 f"column_init_method/row_init_method), got {method!r}")
        self.net.add_adapter(lora_config(rank, alpha, target_modules))
        named = [(n, p) for n, p in self.net.named_parameters() if "lora_" in n]
        if not named:
            raise ValueError(f"no module of the denoising network matched LoRA target_modules {list(target_modules)}")
        params = []
        with torch.no_grad():
            for name, p in named:
                p.data = p.data.float()
                if ".lora_A." in name:
                    nemo_adapter_init_(p.data, column_init_method)
                elif ".lora_B." in name:
                    nemo_adapter_init_(p.data, row_init_method)
                p.requires_grad_(True)
                params.append(p)
        if dropout:
            from peft.tuners.lora import LoraLayer

            def post_dropout(module, inputs, output, p=float(dropout)):
                return torch.nn.functional.dropout(output, p=p, training=module.training)

            for m in self.net.modules():
                if isinstance(m, LoraLayer):
                    for b in m.lora_B.values():
                        b.register_forward_hook(post_dropout)
        return params

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def set_full_finetune(self) -> List[torch.nn.Parameter]:
        self.net.requires_grad_(True)
        return list(self.net.parameters())

    def to(self, device):
        for m in [self.net, self.vae, *self.text_encoders]:
            m.to(device)
        if self.reference_model is not None and self.reference_model.frozen is not None:
            self.reference_model.frozen.to(device)
        return self
