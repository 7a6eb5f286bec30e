"""The NeMo shell every algorithm runs in: state and verbs on ``ModelPT``, the loop in the recipe.

:class:`AlignmentModel` holds what a run has — the backend (denoising network, VAE, text encoders),
the adapters and the reference, the reward, the prompts, the consumed-sample count — and offers the
verbs a recipe needs: ``sampling_setup``, ``decode``, ``score``, ``render``, ``generator``. The training
loop of ``model.algorithm`` is its recipe (:mod:`..algorithms`), looked up in the algorithm registry;
``training_step`` only hands the batch over.

Randomness is stateless: each sample's initial latents come from a generator seeded by
``(model.seed, global sample index, purpose)``, and the other draws of a micro-batch (eta-noise,
cuts) from one seeded by ``(model.seed, global index of its first sample, purpose)``; the global
sample index is ``round × micro × dp_size + dp_rank × micro + i``, a *round* being one micro-batch
on every rank. A resumed run therefore draws exactly what an uninterrupted one would, without
saving RNG state; ranks draw different latents; and the initial latents do not depend on how the
global batch is split over ranks, micro-batches and accumulation.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Dict, List, Optional

import torch
from lightning.pytorch import Trainer
from nemo.core.classes import ModelPT
from omegaconf import DictConfig, OmegaConf

from ..algorithms.registry import get_algorithm
from ..backends import DiffusionBackend, load_backend, lora_targets
from ..config.schema import AlgoLoopConfig, ModelConfig, validate_model
from ..core.sampler import StepPlan, sample
from ..data.prompts import PromptDataset, collate_prompts
from ..errors import InputError, attributed
from ..rewards.base import Reward, check_reward_output
from . import distributed

_log = logging.getLogger("nemo_aligner_draft")


def seeded_generator(*parts) -> torch.Generator:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def frozen_dtype_for(precision) -> torch.dtype:
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float32


# NeMo-Aligner's draftp_sd.yaml values of the keys NeMo parts need, for a config (ours) that does not set them
NEMO_SD_DEFAULTS = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "beta_schedule": "linear",
                    "parameterization": "eps", "scale_factor": 0.18215,
                    "cond_stage_config": {"version": "openai/clip-vit-large-patch14", "max_length": 77}}


def _overlay(base: Dict, top: Dict) -> Dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _overlay(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def build_backend(m: ModelConfig, frozen_dtype: torch.dtype, raw: Optional[Dict] = None) -> DiffusionBackend:
    """The model's backend: from ``model.pretrained`` (a diffusers pipeline directory), or from NeMo-Aligner's
    parts (``model.unet_config.from_pretrained`` and the sections beside it). Then NeMo-Aligner's schedule,
    latent-scale and resolution keys, where given, must agree with what was loaded.

    NeMo parts are built from ``raw``, the ``model`` section as the user wrote it (NeMo-Aligner's keys, read
    as NeMo reads them; the typed config has validated it)."""
    if m.from_nemo_parts:
        from ..backends.nemo_parts import load_nemo_parts_backend
        from ..typed import as_dict

        # the typed section's values (NeMo-Aligner's defaults for keys a config leaves out), under the keys
        # the user wrote (notice keys included: NeMo's loaders read a few, like _target_)
        section = _overlay(as_dict(m), raw or {})
        sdxl = bool(section.get("conditioner_config") or (section.get("unet_config") or {}).get("adm_in_channels"))
        defaults = dict(NEMO_SD_DEFAULTS, scale_factor=0.13025) if sdxl else NEMO_SD_DEFAULTS
        for key, value in defaults.items():  # what NeMo-Aligner's draftp_sd(xl).yaml say, where unset here
            if section.get(key) is None and not (key == "cond_stage_config" and sdxl):
                section[key] = value
        with attributed("model.unet_config.from_pretrained", "NeMo-Aligner's model parts", m.unet_config.from_pretrained):
            backend = load_nemo_parts_backend(section, frozen_dtype)
    else:
        with attributed("model.pretrained", "a diffusers pipeline", m.pretrained):
            backend = load_backend(m.pretrained, m.family, frozen_dtype)
    check_nemo_keys(m, backend)
    return backend


def check_nemo_keys(m: ModelConfig, backend: DiffusionBackend) -> None:
    """NeMo-Aligner's noise-schedule and latent keys describe the model; given with a diffusers pipeline
    (NeMo-Aligner's config files carry SD1.5's values), they must be the pipeline's, not silently ignored."""
    sched = backend.scheduler.config
    betas = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}  # LDM → diffusers
    checks = [
        ("model.linear_start", m.linear_start, sched.get("beta_start")),
        ("model.linear_end", m.linear_end, sched.get("beta_end")),
        ("model.timesteps", m.timesteps, sched.get("num_train_timesteps")),
        ("model.beta_schedule", betas.get(m.beta_schedule, m.beta_schedule) if m.beta_schedule else None,
         sched.get("beta_schedule")),
        ("model.parameterization", {"eps": "epsilon", "v": "v_prediction"}.get(m.parameterization),
         sched.get("prediction_type")),
        ("model.scale_factor", m.scale_factor, float(backend.vae.config.scaling_factor)),
        ("model.infer.down_factor", m.infer.down_factor, backend.vae_scale_factor),
    ]
    for key, given, actual in checks:
        if given is None or actual is None:
            continue
        same = abs(float(given) - float(actual)) <= 1e-6 * max(1.0, abs(float(actual))) \
            if isinstance(given, (int, float)) and isinstance(actual, (int, float)) else given == actual
        if not same:
            where = "the NeMo parts" if m.from_nemo_parts else f"the pipeline at model.pretrained ({m.pretrained})"
            raise InputError(key, f"got {given!r}, but {where} has {actual!r}; set {key} to match or remove it")


def restore_nemo_adapters(backend: DiffusionBackend, path: str, rank: int) -> None:
    """Start from a NeMo-Aligner DRaFT+ LoRA (``.nemo``, Lightning ``.ckpt`` or state dict), as its
    ``init_peft`` does with ``model.peft.restore_from_path``: every adapter of the file into the one just
    inserted, bit for bit (the reference stays the base model)."""
    from ..export.nemo_adapters import nemo_to_peft
    from ..export.read import read_nemo_archive

    _, weights = read_nemo_archive(path)
    state, file_rank, _ = nemo_to_peft(weights, backend.net)
    if file_rank != rank:
        raise ValueError(f"the adapters in {path!r} have rank {file_rank}, model.peft.lora_tuning.adapter_dim is {rank}")
    own = {n: p for n, p in backend.net.named_parameters() if "lora_" in n}
    by_module = {}
    for name, p in own.items():  # peft names them <module>.lora_A.<adapter>.weight
        module, _, rest = name.partition(".lora_")
        by_module[f"{module}.lora_{rest.split('.', 1)[0]}.weight"] = p
    missing = sorted(k for k in by_module if k not in state)
    unknown = sorted(k for k in state if k not in by_module)
    if missing or unknown:
        raise ValueError(f"the adapters in {path!r} do not match model.peft's: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unknown)} not inserted here (e.g. {unknown[:3]})")
    with torch.no_grad():
        for k, p in by_module.items():
            p.copy_(state[k].to(p.dtype))


def validation_means(outputs: List[Dict]) -> Dict[str, float]:
    """Mean base and tuned validation reward of a validation's batches, and their paired gain."""
    rb = torch.cat([o["reward_base"] for o in outputs])
    rt = torch.cat([o["reward_tuned"] for o in outputs])
    return {"val_reward": float(rt.mean()), "val_reward_base": float(rb.mean()),
            "val_reward_gain": float((rt.double() - rb.double()).mean())}


class AlignmentModel(ModelPT):
    """``cfg`` is the ``model`` section as a DictConfig (what ``.nemo`` archives store); ``config`` the same
    section already validated (the CLI passes it; restoring an archive validates ``cfg``)."""

    def __init__(self, cfg: DictConfig, trainer: Optional[Trainer] = None, config: Optional[ModelConfig] = None,
                 loop: Optional[AlgoLoopConfig] = None, reward: Optional[Reward] = None,
                 train_prompts: Optional[List[str]] = None, val_prompts: Optional[List[str]] = None, precision="32"):
        super().__init__(cfg=cfg, trainer=trainer)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable weights
        if config is None:
            raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
            config = validate_model(raw)
        self.mcfg = m = config
        self.loop = loop or AlgoLoopConfig()
        self.precision_name = str(precision)
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        backend = build_backend(m, frozen_dtype_for(precision), raw)
        self.backend: DiffusionBackend = backend
        with attributed("model.infer.sampler"):  # the sampler must fit the family (flow: sd3, flux)
            backend.set_resolution(m.infer.height, m.infer.width)
            self.step_rule()
        with attributed("model.infer.unconditional_guidance_scale"):
            backend.check_guidance_scale(m.infer.unconditional_guidance_scale)
        if m.activation_checkpointing:
            with attributed("model.activation_checkpointing"):
                backend.set_activation_checkpointing(True)
        # registered so Lightning moves them and .nemo archives are self-contained
        self.unet = backend.net
        self.vae = backend.vae
        self.text_encoders = torch.nn.ModuleList(backend.text_encoders)
        scheme, lora = m.peft.peft_scheme, m.peft.lora_tuning
        if scheme == "none":
            backend.set_full_finetune()
        else:
            key = "model.peft.lora_tuning.target_modules" if lora.target_modules else "model.peft.peft_scheme"
            with attributed(key):
                backend.add_lora(lora.adapter_dim, lora.network_alpha,
                                 lora.target_modules or lora_targets(backend.family, scheme),
                                 column_init_method=lora.column_init_method, row_init_method=lora.row_init_method,
                                 dropout=lora.adapter_dropout)
        if m.peft.restore_from_path:
            if scheme == "none":
                raise InputError("model.peft.restore_from_path", "set, but model.peft.peft_scheme is 'none'")
            with attributed("model.peft.restore_from_path", "NeMo-Aligner LoRA adapters", m.peft.restore_from_path):
                restore_nemo_adapters(backend, m.peft.restore_from_path, lora.adapter_dim)
        with attributed("model.peft.peft_scheme"):
            backend.setup_reference(use_adapters=scheme != "none")
        self.reward = reward
        self.train_prompts = train_prompts
        self.val_prompts = val_prompts
        self.consumed_samples = 0
        self.nan_skipped_steps = 0
        self.overflow_skipped_steps = 0  # fp16 loss-scale overflows (algorithms/optimizer_step.py)
        self.val_outputs: List[Dict] = []
        self.recipe = get_algorithm(m.algorithm).recipe_class()(self)

    # ------------------------------------------------------------------ NeMo plumbing
    @classmethod
    def list_available_models(cls):
        return None

    def setup_training_data(self, train_data_config):  # data comes from model.data via train_dataloader
        pass

    def setup_validation_data(self, val_data_config):
        pass

    # ------------------------------------------------------------------ distributed
    def setup(self, stage: str) -> None:
        distributed.initialize()
        ref = self.backend.reference_model
        if ref is not None and ref.frozen is not None:
            ref.frozen.to(self.device)

    def teardown(self, stage: str) -> None:
        distributed.finalize()

    @property
    def dp_rank(self) -> int:
        return distributed.data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return distributed.data_parallel_size()

    @property
    def gradients_sharded(self) -> bool:
        """Whether each rank holds only a shard of the gradients (``trainer.strategy=fsdp``)."""
        from lightning.pytorch.strategies import FSDPStrategy

        from .fsdp import ShardedStrategy

        trainer = getattr(self, "_trainer", None)
        return trainer is not None and isinstance(trainer.strategy, (FSDPStrategy, ShardedStrategy))

    def configure_model(self) -> None:
        """``trainer.strategy=fsdp``: shard the trained network and the full-fine-tune reference by block
        over the data-parallel mesh (models/fsdp.py). Other strategies: nothing to do."""
        from . import fsdp

        trainer = getattr(self, "_trainer", None)
        strategy = getattr(trainer, "strategy", None)
        if not isinstance(strategy, fsdp.ShardedStrategy) or fsdp.is_sharded(self.backend.net):
            return
        mesh = strategy.device_mesh["data_parallel"]
        fsdp.shard_network(self.backend.net, mesh)
        ref = self.backend.reference_model
        if ref is not None and ref.frozen is not None:
            fsdp.shard_network(ref.frozen, mesh)
        # sharded parameters take their gradients through FSDP's hooks: the sampler's checkpointed steps
        # use torch's checkpoint, not the explicit-inputs one (core/sampler.py)
        self.backend.exact_step_checkpoint = False

    def on_after_backward(self) -> None:
        from . import fsdp

        if fsdp.is_sharded(self.backend.net):
            fsdp.reshard_all(self.backend.net)

    def save_to(self, save_path: str):
        """The ``.nemo`` archive. Under ``trainer.strategy=fsdp`` every rank first gathers the sharded
        weights (:func:`.fsdp.full_state_dict`) and rank 0 archives the whole tensors."""
        from . import fsdp

        if not fsdp.is_sharded(self.backend.net):
            return super().save_to(save_path)
        self._gathered_state = fsdp.full_state_dict(self)
        try:
            return super().save_to(save_path)
        finally:
            self._gathered_state = None

    def state_dict(self, *args, **kwargs):
        gathered = getattr(self, "_gathered_state", None)
        if gathered is not None and not args and not kwargs:
            return dict(gathered)
        return super().state_dict(*args, **kwargs)

    @property
    def dp_group(self):
        """megatron-core's data-parallel process group (None: the default group)."""
        return distributed.data_parallel_group()

    @property
    def round_size(self) -> int:
        return self.mcfg.micro_batch_size * self.dp_size

    @property
    def accumulation(self) -> int:
        return max(self.mcfg.global_batch_size // self.round_size, 1)

    def first_sample_index(self, round_idx: int) -> int:
        """Global index of this rank's first sample in round ``round_idx`` (same as the sampler's layout)."""
        return round_idx * self.round_size + self.dp_rank * self.mcfg.micro_batch_size

    def generator(self, round_idx: int, purpose: str) -> torch.Generator:
        # Keyed on the global sample offset, not on (rank, round): a 2-rank run and a 1-process run
        # with accumulation 2 then see the same micro-batches with the same noise.
        return seeded_generator(self.mcfg.seed, "micro", self.first_sample_index(round_idx), purpose)

    # ------------------------------------------------------------------ data
    def train_source(self):
        """The training prompts as a :class:`~..data.source.PromptSource` (``train_prompts`` may be one — a
        list or a webdataset stream from :func:`~..data.source.open_prompt_source` — or a plain list)."""
        from ..data.source import as_prompt_source

        return as_prompt_source(self.train_prompts)

    def train_dataloader(self):
        source = self.train_source()
        if hasattr(self.recipe, "check_prompts"):
            self.recipe.check_prompts(len(source))
        trainer = getattr(self, "_trainer", None)
        max_steps = trainer.max_steps if trainer is not None else -1
        length = self.recipe.planned_batches(max_steps) if max_steps and max_steps > 0 else 2**62
        # Always shuffled, reshuffled per epoch from model.seed (NeMo-Aligner's DRaFT+ always draws with
        # its random sampler, whatever model.data.shuffle_data says); the order ignores num_workers.
        return source.dataloader(self.recipe.prompts_per_step, self.dp_rank, self.dp_size, self.mcfg.seed,
                                 consumed_samples=lambda: self.consumed_samples, length=length, shuffle=True,
                                 num_workers=int(getattr(self.mcfg.data, "num_workers", 0) or 0))

    def val_dataloader(self):
        prompts = self.val_prompts or self.train_prompts
        total = self.loop.limit_val_batches * self.mcfg.micro_batch_size
        k = self.mcfg.diversity.samples_per_prompt  # each prompt k times, each with its own latents
        prompts = [p for p in prompts[:-(-total // k)] for _ in range(k)][:total]
        ds = PromptDataset(prompts)
        return torch.utils.data.DataLoader(ds, batch_size=self.mcfg.micro_batch_size, shuffle=False,
                                           collate_fn=collate_prompts, num_workers=0)

    # ------------------------------------------------------------------ verbs for the recipes
    def score(self, images: torch.Tensor, prompts: List[str]):
        """Reward ``[B]`` plus its parts (rm.fp32 is handled by the reward itself, see rewards/base.py)."""
        if self.reward is None:
            raise RuntimeError("no reward model attached")
        self.reward.to(images.device)
        total, parts = self.reward.score_with_parts(images, prompts)
        check_reward_output(total, images.shape[0], self.reward.name)
        return total.float(), parts

    def step_rule(self, num_steps: Optional[int] = None):
        """The sampler rule for ``model.infer`` (``sampler: default`` lets the model family choose)."""
        inf = self.mcfg.infer
        return self.backend.step_rule(num_steps or inf.inference_steps, None if inf.sampler == "default" else inf.sampler)

    def encode(self, prompts: List[str]):
        """Prompt conditioning at ``model.infer``'s resolution (SDXL's time ids depend on it)."""
        inf, base = self.mcfg.infer, (self.mcfg.sampling.base if self.mcfg.sampling is not None else None)
        if base is None:
            self.backend.set_resolution(inf.height, inf.width)
        else:  # NeMo-Aligner's SDXL micro-conditioning (model.sampling.base.orig_* / crop_coords_*)
            self.backend.set_resolution(inf.height, inf.width, original=(base.orig_height or inf.height,
                                                                         base.orig_width or inf.width),
                                        crop=(base.crop_coords_top, base.crop_coords_left))
        return self.backend.encode_prompts(prompts)

    def sampling_setup(self, prompts: List[str], round_idx: int, purpose: str, num_steps: Optional[int] = None):
        """(rule, conditioning, initial latents, generator for the micro-batch's other draws); ``num_steps``
        other than ``model.infer.inference_steps`` for rollouts on a shorter sampler (GRPO)."""
        inf = self.mcfg.infer
        cond = self.encode(prompts)  # first: it sets the resolution, which a flow schedule depends on (FLUX)
        rule = self.step_rule(num_steps)
        g = self.generator(round_idx, purpose)
        # one generator per global sample: initial latents do not depend on how the global batch is split
        first = self.first_sample_index(round_idx)
        latents = torch.cat([
            self.backend.initial_latents(1, inf.height, inf.width, rule,
                                         generator=seeded_generator(self.mcfg.seed, "sample", first + i, purpose))
            for i in range(len(prompts))])
        return rule, cond, latents, g

    def decode(self, latents):
        return self.backend.decode(latents, self.mcfg.infer.vae_batch_size)

    @torch.no_grad()
    def render(self, prompts: List[str], seed_index: int, use_reference: bool,
               num_steps: Optional[int] = None) -> torch.Tensor:
        """Images from fixed latents (seeded by the validation index), deterministic sampler, policy or
        reference; ``num_steps`` other than ``model.infer.inference_steps`` for few-step evaluation."""
        inf = self.mcfg.infer
        cond = self.encode(prompts)  # before the rule, as in sampling_setup
        rule = self.step_rule(num_steps)
        g = seeded_generator(self.mcfg.seed, "validation", seed_index)
        latents = self.backend.initial_latents(len(prompts), inf.height, inf.width, rule, generator=g)
        den = (self.backend.reference_denoiser(cond, inf.unconditional_guidance_scale) if use_reference
               else self.backend.denoiser(cond, inf.unconditional_guidance_scale))
        out = sample(den, rule, latents, StepPlan.no_grad(rule.num_steps), eta=0.0)
        return self.decode(out.pred_x0 if self.mcfg.decode_target == "pred_x0" else out.latents)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        params = self.backend.trainable_parameters()
        o = self.mcfg.optim
        opt = None
        if o.name == "fused_adam":
            fused = fused_adam_class()
            if fused is not None:
                opt = fused(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, adam_w_mode=True)
            else:
                _log.warning("notice: model.optim.name: fused_adam needs apex, which is not importable here; "
                             "torch.optim.AdamW runs the same update (decoupled weight decay, as apex's "
                             "adam_w_mode)")
        if opt is None:
            cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
            opt = cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(o.sched.name, o.sched.warmup_steps))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def training_step(self, batch, batch_idx):
        return self.recipe.training_step(batch, batch_idx)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx):
        prompts = batch["prompt"]
        base = self.render(prompts, batch_idx, use_reference=True)
        tuned = self.render(prompts, batch_idx, use_reference=False)
        r_base, _ = self.score(base, prompts)
        r_tuned, _ = self.score(tuned, prompts)
        self.val_outputs.append({"prompts": prompts, "base": base.cpu(), "tuned": tuned.cpu(),
                                 "reward_base": r_base.cpu(), "reward_tuned": r_tuned.cpu(),
                                 "extra_rewards": self.recipe.validation_extras(prompts, batch_idx)})

    def on_validation_epoch_start(self):
        self.val_outputs = []

    def on_validation_epoch_end(self):
        if not self.val_outputs:
            return
        logs = validation_means(self.val_outputs)
        for key in self.val_outputs[0]["extra_rewards"]:
            logs[f"val_{key}"] = float(torch.cat([o["extra_rewards"][key] for o in self.val_outputs]).mean())
        self.log_dict(logs, on_epoch=True, sync_dist=True, sync_dist_group=self.dp_group)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["alignment_state"] = {"consumed_samples": self.consumed_samples,
                                         "nan_skipped_steps": self.nan_skipped_steps,
                                         "overflow_skipped_steps": self.overflow_skipped_steps,
                                         "peft_scheme": self.mcfg.peft.peft_scheme,
                                         "adapter_dim": self.mcfg.peft.lora_tuning.adapter_dim}
        state = self.recipe.state_dict()
        if state:
            checkpoint[getattr(self.recipe, "state_key", "recipe_state")] = state

    def on_train_start(self) -> None:
        # Restored EMA state (exp_manager.ema): NeMo's -EMA.ckpt stores the live parameters in its
        # "ema" slot, so after a resume the EMA copies are leaves that require grad and NeMo's
        # in-place weight swap at the next save fails. They are plain buffers: drop the grad flag.
        for opt in self.trainer.optimizers:
            ema = getattr(opt, "ema_params", None)
            if ema:
                opt.ema_params = tuple(t.detach() for t in ema)

    def checkpoint_key(self) -> str:
        """What a resume error blames: the checkpoint file being restored (exp_manager picked it)."""
        trainer = getattr(self, "_trainer", None)
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        return str(path) if path else "exp_manager.resume_if_exists"

    def on_load_checkpoint(self, checkpoint: Dict) -> None:
        key = self.checkpoint_key()
        state = checkpoint.get("alignment_state")
        if state is None:
            raise InputError(key, "checkpoint has no alignment_state: it was not written by nemo_aligner_draft")
        mine = (self.mcfg.peft.peft_scheme, self.mcfg.peft.lora_tuning.adapter_dim)
        theirs = (state.get("peft_scheme"), state.get("adapter_dim"))
        if mine != theirs:
            raise InputError(key, f"checkpoint was trained with peft_scheme/adapter_dim={theirs}, but the config "
                                  f"has model.peft.peft_scheme/model.peft.lora_tuning.adapter_dim={mine}")
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(own) - set(checkpoint["state_dict"]))
        shapes = [k for k, v in checkpoint["state_dict"].items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if missing or shapes:
            raise InputError(key, f"checkpoint does not match this model: {len(missing)} missing trainable tensors "
                                  f"(e.g. {missing[:3]}), {len(shapes)} with mismatched shapes (e.g. {shapes[:3]})")
        self.consumed_samples = int(state["consumed_samples"])
        self.nan_skipped_steps = int(state["nan_skipped_steps"])
        self.overflow_skipped_steps = int(state.get("overflow_skipped_steps", 0))  # absent before fp16 support
        if self.recipe.state_dict():  # a recipe with state of its own expects it back
            self.recipe.load_state_dict(checkpoint.get(getattr(self.recipe, "state_key", "recipe_state")))


def fused_adam_class():
    """apex's ``FusedAdam`` (what NeMo's ``fused_adam`` is), or None when apex is not importable."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    return FusedAdam


def lr_factor(name: str, warmup: int):
    """The learning-rate multiplier at optimizer step ``s`` (0-based) of ``model.optim.sched``.

    ``linear_warmup``: min(1, (s + 1) / warmup). ``WarmupHoldPolicy`` (NeMo's, nemo/core/optim/lr_scheduler.py
    v2.1.0): (s + 1) / (warmup + 1) while s <= warmup, then 1 — its hold phase and what follows both return
    the base rate."""
    if not warmup:
        return lambda s: 1.0
    if name == "WarmupHoldPolicy":
        return lambda s: (s + 1) / (warmup + 1) if s <= warmup else 1.0
    return lambda s: min(1.0, (s + 1) / warmup)


def steps_per_epoch(num_prompts: int, global_batch_size: int) -> int:
    return max(num_prompts // global_batch_size, 1)


def effective_max_steps(loop: AlgoLoopConfig, trainer_max_steps: int, num_prompts: int, global_batch_size: int,
                        infinite: bool = False) -> int:
    """trainer.<algo>.max_steps if set, else trainer.max_steps; capped by max_epochs passes unless the prompt
    stream is infinite (NeMo-Aligner's model.data.webdataset.infinite_sampler)."""
    steps = loop.max_steps if loop.max_steps > 0 else trainer_max_steps
    if loop.max_epochs > 0 and not infinite:
        cap = loop.max_epochs * steps_per_epoch(num_prompts, global_batch_size)
        steps = cap if steps <= 0 else min(steps, cap)
    return int(steps)
