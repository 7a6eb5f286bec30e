"""The configuration schema: NeMo-Aligner's key names, typed, every key read by code.

``validate(raw)`` walks a plain dict (from Hydra/OmegaConf) against the dataclasses below and returns
the typed tree or raises :class:`ConfigError` listing *every* problem: unknown keys, wrong types,
out-of-range values. Nothing heavy happens before validation passes.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ..errors import ConfigError  # noqa: F401  (re-exported: config.ConfigError)
from .tracking import Node

ALGORITHMS = ("draftp", "alignprop", "ddpo", "sdpo")


# --------------------------------------------------------------------------- trainer
@dataclass
class AlgoLoopConfig(Node):
    """``trainer.<algorithm>`` (``trainer.draftp_sd`` in NeMo-Aligner's files)."""

    max_epochs: int = 1  # caps the run at max_epochs passes over the train prompts (-1: no cap)
    max_steps: int = -1  # optimizer steps; -1: fall back to trainer.max_steps
    val_check_interval: int = 0  # validate every N optimizer steps (0: never)
    save_interval: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    limit_val_batches: int = 1  # validation micro-batches per validation
    gradient_clip_val: float = 0.0  # clip the global grad norm (0: no clipping)


@dataclass
class TrainerConfig(Node):
    devices: Union[int, str] = 1
    num_nodes: int = 1
    accelerator: str = "auto"  # cpu | gpu | auto
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: Union[int, str] = 32  # 32 | bf16-mixed | 16-mixed
    max_steps: int = -1
    log_every_n_steps: int = 1
    draftp_sd: Optional[AlgoLoopConfig] = None
    alignprop: Optional[AlgoLoopConfig] = None
    ddpo: Optional[AlgoLoopConfig] = None
    sdpo: Optional[AlgoLoopConfig] = None


# --------------------------------------------------------------------------- exp_manager
@dataclass
class CheckpointParams(Node):
    save_top_k: int = 1
    save_last: bool = True
    filename: str = "step={step}"


@dataclass
class EMAConfig(Node):
    enable: bool = False
    decay: float = 0.999


@dataclass
class ExpManagerConfig(Node):
    explicit_log_dir: Optional[str] = None
    exp_dir: Optional[str] = None
    name: Optional[str] = None
    create_wandb_logger: bool = False
    create_tensorboard_logger: bool = True
    resume_if_exists: bool = True
    checkpoint_callback_params: CheckpointParams = field(default_factory=CheckpointParams)
    ema: EMAConfig = field(default_factory=EMAConfig)


# --------------------------------------------------------------------------- model
@dataclass
class InferConfig(Node):
    unconditional_guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    inference_steps: int = 50
    eta: float = 0.0
    vae_batch_size: int = 8
    sampler: str = "default"  # default (ddim for SD, euler for SDXL) | ddim | euler


@dataclass
class LoraTuningConfig(Node):
    adapter_dim: int = 32
    network_alpha: float = 32.0
    target_modules: Optional[List[str]] = None  # None: the peft_scheme's default targets


@dataclass
class PeftConfig(Node):
    peft_scheme: str = "sdlora"  # sdlora | lora | none
    lora_tuning: LoraTuningConfig = field(default_factory=LoraTuningConfig)


@dataclass
class SchedConfig(Node):
    warmup_steps: int = 0


@dataclass
class OptimConfig(Node):
    name: str = "adamw"  # adamw | fused_adam (apex, when importable)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    sched: SchedConfig = field(default_factory=SchedConfig)


@dataclass
class DatasetConfig(Node):
    dataset_path: Optional[str] = None  # a prompt file (.txt one per line, .jsonl with "prompt") or builtin:<name>


@dataclass
class DataConfig(Node):
    train: DatasetConfig = field(default_factory=DatasetConfig)
    validation: DatasetConfig = field(default_factory=DatasetConfig)
    max_prompt_chars: int = 1000  # longer prompt lines are an error (the tokenizer truncates at 77 tokens)


@dataclass
class AlignPropConfig(Node):
    truncation: str = "per_rollout"  # per_step (original: redraw each step, detach output) | per_rollout
    cut_distribution: str = "gaussian"  # gaussian | uniform | fixed
    cut_mean: float = 42.0  # in units of a 50-step schedule; scaled to inference_steps
    cut_std: float = 5.0
    cut_min: int = 0  # uniform cuts (and per_step redraws) lie in [cut_min, cut_max]
    cut_max: int = 50
    fixed_cut: int = 49  # cut_distribution=fixed: gradient on steps >= fixed_cut (49 of 50 = K=1)
    reference_steps: int = 50  # the schedule length the cut values refer to
    loss_mode: str = "negate"  # negate | target
    loss_target: float = 0.0
    loss_coeff: float = 1.0


@dataclass
class DDPOConfig(Node):
    num_sample_batches: int = 2  # sample micro-batches per epoch of PPO
    num_inner_epochs: int = 1
    train_micro_batch_size: int = 1
    timestep_fraction: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    per_prompt_stat_tracking: bool = True
    stat_buffer_size: int = 32
    stat_min_count: int = 16


@dataclass
class SDPOConfig(Node):
    num_sample_batches: int = 2  # sample micro-batches (of pairs) per epoch
    num_inner_epochs: int = 1
    train_micro_batch_size: int = 1  # pairs per train micro-batch
    timestep_fraction: float = 1.0
    gamma: float = 0.99
    lam: float = 0.99  # temporal importance weight λ^i
    log_scale: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    stat_buffer_size: int = 32
    stat_min_count: int = 16
    per_prompt_stat_tracking: bool = True
    eval_steps: List[int] = field(default_factory=lambda: [1, 2, 4, 8])


@dataclass
class DiversityConfig(Node):
    """Per-prompt LPIPS diversity in validation (off unless a local backbone file is given)."""

    lpips_backbone_path: Optional[str] = None  # torchvision AlexNet/VGG16 state dict (local file)
    lpips_net: str = "alex"  # alex | vgg
    samples_per_prompt: int = 1  # validation images per prompt (LPIPS needs >= 2)


@dataclass
class ModelConfig(Node):
    algorithm: str = "draftp"  # draftp (DRaFT, DRaFT+, DRaFT-K, DRaFT-LV) | alignprop | ddpo | sdpo
    pretrained: Optional[str] = None  # a local diffusers pipeline directory
    family: str = "auto"  # auto | sd | sdxl
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 1
    kl_coeff: float = 1.0
    truncation_steps: int = 1
    lv_copies: int = 0  # DRaFT-LV: re-noised copies at the last step (0: off)
    decode_target: str = "pred_x0"  # pred_x0 (NeMo-Aligner) | x0
    sampler_checkpointing: bool = False  # per-step gradient checkpointing of the sampler
    activation_checkpointing: bool = False  # inside-UNet activation checkpointing
    nan_tolerance: int = 5  # stop after this many consecutive non-finite steps
    infer: InferConfig = field(default_factory=InferConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    alignprop: Optional[AlignPropConfig] = None
    ddpo: Optional[DDPOConfig] = None
    sdpo: Optional[SDPOConfig] = None


# --------------------------------------------------------------------------- reward
@dataclass
class RMModelConfig(Node):
    restore_from_path: Optional[str] = None


@dataclass
class RewardComponent(Node):
    name: str = ""
    weight: float = 1.0
    model: RMModelConfig = field(default_factory=RMModelConfig)
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RMConfig(Node):
    name: str = "colorfulness"  # a registered reward, weighted_sum, or package.module:callable
    model: RMModelConfig = field(default_factory=RMModelConfig)
    fp32: bool = False  # run the reward model in fp32 under bf16 autocast
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the reward factory
    components: List[RewardComponent] = field(default_factory=list)  # for weighted_sum


@dataclass
class Config(Node):
    name: str = "draftp_sd"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rm: RMConfig = field(default_factory=RMConfig)

    @property
    def loop(self) -> AlgoLoopConfig:
        """The algorithm's own loop section (``trainer.draftp_sd`` for DRaFT+)."""
        section = {"draftp": "draftp_sd"}.get(self.model.algorithm, self.model.algorithm)
        return getattr(self.trainer, section)


# --------------------------------------------------------------------------- conversion
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, key: str, problems: List[str]):
    if isinstance(value, str) and value == "???":
        problems.append(f"{key}: mandatory value missing (the config has ???; set it, e.g. {key}=...)")
        return None
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            problems.append(f"{key}: must not be null (expected {_type_name(tp)})")
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:  # first type that converts without problems
            trial: List[str] = []
            out = _convert(a, value, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: got {value!r}, expected {_type_name(tp)}")
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: got {value!r}, expected a mapping")
            return None
        return _build(tp, value, key, problems)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: got {value!r}, expected {_type_name(tp)}")
            return None
        (item,) = typing.get_args(tp)
        return [_convert(item, v, key, problems) for v in value]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            problems.append(f"{key}: got {value!r}, expected a mapping")
            return None
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{key}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
    return None


def _build(cls, raw: Dict, path: str, problems: List[str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            full = f"{path}.{k}" if path else str(k)
            problems.append(f"{full}: unknown key (known keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            key = f"{path}.{f.name}" if path else f.name
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], key, problems)
    try:
        node = cls(**{k: v for k, v in kwargs.items() if v is not None or _nullable(hints[k])})
    except TypeError as e:  # pragma: no cover - dataclass defaults cover every field
        problems.append(f"{path}: {e}")
        return None
    _set_paths(node, path)
    return node


def _nullable(tp) -> bool:
    return typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)


def _set_paths(node: Node, path: str) -> None:
    object.__setattr__(node, "_path", path)
    for f in dataclasses.fields(node):
        v = object.__getattribute__(node, f.name)
        key = f"{path}.{f.name}" if path else f.name
        if isinstance(v, Node):
            _set_paths(v, key)
        elif isinstance(v, list):
            for item in v:
                if isinstance(item, Node):
                    _set_paths(item, key)


# --------------------------------------------------------------------------- semantic checks
def _check(cfg: Config, problems: List[str]) -> None:
    m, inf, t = cfg.model, cfg.model.infer, cfg.trainer

    def bad(key, value, expected):
        problems.append(f"{key}: got {value!r}, expected {expected}")

    if m.algorithm not in ALGORITHMS:
        bad("model.algorithm", m.algorithm, f"one of {', '.join(ALGORITHMS)}")
    if not m.pretrained:
        bad("model.pretrained", m.pretrained, "a local diffusers pipeline directory")
    if m.family not in ("auto", "sd", "sdxl"):
        bad("model.family", m.family, "auto, sd or sdxl")
    for key in ("height", "width"):
        v = getattr(inf, key)
        if v <= 0 or v % 8:
            bad(f"model.infer.{key}", v, "a positive multiple of 8 (the VAE downsamples by 8)")
    if inf.inference_steps < 1:
        bad("model.infer.inference_steps", inf.inference_steps, "an integer >= 1")
    if not 1 <= m.truncation_steps <= max(inf.inference_steps, 1):
        bad("model.truncation_steps", m.truncation_steps,
            f"an integer in [1, model.infer.inference_steps={inf.inference_steps}]")
    if inf.unconditional_guidance_scale < 0:
        bad("model.infer.unconditional_guidance_scale", inf.unconditional_guidance_scale, "a number >= 0")
    if inf.eta < 0:
        bad("model.infer.eta", inf.eta, "a number >= 0")
    if inf.vae_batch_size < 1:
        bad("model.infer.vae_batch_size", inf.vae_batch_size, "an integer >= 1")
    if inf.sampler not in ("default", "ddim", "euler"):
        bad("model.infer.sampler", inf.sampler, "default, ddim or euler")
    if m.kl_coeff < 0:
        bad("model.kl_coeff", m.kl_coeff, "a number >= 0")
    if m.lv_copies < 0:
        bad("model.lv_copies", m.lv_copies, "an integer >= 0")
    if m.lv_copies and m.truncation_steps != 1:
        bad("model.truncation_steps", m.truncation_steps, "1 when model.lv_copies > 0 (DRaFT-LV is K=1)")
    if m.decode_target not in ("pred_x0", "x0"):
        bad("model.decode_target", m.decode_target, "pred_x0 or x0")
    if m.nan_tolerance < 1:
        bad("model.nan_tolerance", m.nan_tolerance, "an integer >= 1")
    if m.micro_batch_size < 1:
        bad("model.micro_batch_size", m.micro_batch_size, "an integer >= 1")
    if m.global_batch_size < 1:
        bad("model.global_batch_size", m.global_batch_size, "an integer >= 1")
    world = data_parallel_size(cfg)
    if m.micro_batch_size >= 1 and m.global_batch_size >= 1 and world:
        if m.global_batch_size % (m.micro_batch_size * world):
            bad("model.global_batch_size", m.global_batch_size,
                f"a multiple of model.micro_batch_size × data-parallel size = "
                f"{m.micro_batch_size} × {world} = {m.micro_batch_size * world}")
    p = m.peft
    if p.peft_scheme not in ("sdlora", "lora", "none"):
        bad("model.peft.peft_scheme", p.peft_scheme, "sdlora, lora or none")
    if p.lora_tuning.adapter_dim <= 0:
        bad("model.peft.lora_tuning.adapter_dim", p.lora_tuning.adapter_dim, "an integer > 0 (the LoRA rank)")
    if p.lora_tuning.network_alpha <= 0:
        bad("model.peft.lora_tuning.network_alpha", p.lora_tuning.network_alpha, "a number > 0")
    o = m.optim
    if o.name not in ("adamw", "fused_adam", "adam"):
        bad("model.optim.name", o.name, "adamw, adam or fused_adam")
    if o.lr < 0:
        bad("model.optim.lr", o.lr, "a number >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        bad("model.optim.betas", o.betas, "two numbers in [0, 1)")
    if o.sched.warmup_steps < 0:
        bad("model.optim.sched.warmup_steps", o.sched.warmup_steps, "an integer >= 0")
    if not m.data.train.dataset_path:
        bad("model.data.train.dataset_path", m.data.train.dataset_path, "a prompt file path or builtin:<name>")
    if m.data.max_prompt_chars < 1:
        bad("model.data.max_prompt_chars", m.data.max_prompt_chars, "an integer >= 1")
    if t.num_nodes < 1:
        bad("trainer.num_nodes", t.num_nodes, "an integer >= 1")
    if isinstance(t.devices, int) and t.devices < 1 and t.devices != -1:
        bad("trainer.devices", t.devices, "an integer >= 1, -1 or 'auto'")
    if str(t.precision) not in ("32", "bf16-mixed", "16-mixed", "bf16", "16"):
        bad("trainer.precision", t.precision, "32, bf16-mixed or 16-mixed")
    if t.strategy not in ("auto", "ddp", "fsdp"):
        bad("trainer.strategy", t.strategy, "auto, ddp or fsdp")
    if t.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        bad("trainer.accelerator", t.accelerator, "auto, cpu or gpu")
    section = {"draftp": "draftp_sd"}.get(m.algorithm, m.algorithm)
    if m.algorithm in ALGORITHMS:
        loop = getattr(t, section)
        if loop is None:
            problems.append(f"trainer.{section}: missing (model.algorithm={m.algorithm} needs its loop section)")
        else:
            steps = loop.max_steps if loop.max_steps > 0 else t.max_steps
            if steps <= 0 and loop.max_epochs <= 0:
                problems.append(f"trainer.{section}.max_steps: the run has no end (set max_steps or max_epochs > 0)")
            for k in ("val_check_interval", "save_interval", "limit_val_batches"):
                if getattr(loop, k) < 0:
                    bad(f"trainer.{section}.{k}", getattr(loop, k), "an integer >= 0")
            if loop.gradient_clip_val < 0:
                bad(f"trainer.{section}.gradient_clip_val", loop.gradient_clip_val, "a number >= 0")
        for other in ("alignprop", "ddpo", "sdpo"):
            if other != m.algorithm and getattr(m, other) is not None:
                problems.append(f"model.{other}: set, but model.algorithm is {m.algorithm!r}")
        if m.algorithm in ("alignprop", "ddpo", "sdpo") and getattr(m, m.algorithm) is None:
            problems.append(f"model.{m.algorithm}: missing (model.algorithm={m.algorithm} needs it)")
    if m.alignprop is not None:
        a = m.alignprop
        if a.truncation not in ("per_step", "per_rollout"):
            bad("model.alignprop.truncation", a.truncation, "per_step or per_rollout")
        if a.cut_distribution not in ("gaussian", "uniform", "fixed"):
            bad("model.alignprop.cut_distribution", a.cut_distribution, "gaussian, uniform or fixed")
        if a.cut_min > a.cut_max:
            bad("model.alignprop.cut_min", a.cut_min, f"<= model.alignprop.cut_max={a.cut_max}")
        if a.cut_std < 0:
            bad("model.alignprop.cut_std", a.cut_std, "a number >= 0")
        if a.reference_steps < 1:
            bad("model.alignprop.reference_steps", a.reference_steps, "an integer >= 1")
        if a.loss_mode not in ("negate", "target"):
            bad("model.alignprop.loss_mode", a.loss_mode, "negate or target")
    for name in ("ddpo", "sdpo"):
        pg = getattr(m, name)
        if pg is None:
            continue
        if not 0 < pg.timestep_fraction <= 1:
            bad(f"model.{name}.timestep_fraction", pg.timestep_fraction, "a number in (0, 1]")
        if m.infer.eta <= 0:
            bad("model.infer.eta", m.infer.eta, f"> 0 for {name.upper()} (log-probabilities need a stochastic sampler)")
        for k in ("num_sample_batches", "num_inner_epochs", "train_micro_batch_size", "stat_buffer_size",
                  "stat_min_count"):
            if getattr(pg, k) < 1:
                bad(f"model.{name}.{k}", getattr(pg, k), "an integer >= 1")
        if pg.stat_min_count > pg.stat_buffer_size:
            bad(f"model.{name}.stat_min_count", pg.stat_min_count, f"<= model.{name}.stat_buffer_size={pg.stat_buffer_size}")
        if pg.train_micro_batch_size >= 1 and m.micro_batch_size % pg.train_micro_batch_size:
            bad(f"model.{name}.train_micro_batch_size", pg.train_micro_batch_size,
                f"a divisor of model.micro_batch_size={m.micro_batch_size} (one optimizer step per sample batch)")
        if world and m.global_batch_size != m.micro_batch_size * world:
            bad("model.global_batch_size", m.global_batch_size,
                f"model.micro_batch_size × data-parallel size = {m.micro_batch_size * world} for {name} "
                f"(samples per epoch are set by model.{name}.num_sample_batches)")
        if pg.clip_range < 0 or pg.adv_clip_max <= 0:
            bad(f"model.{name}.clip_range", pg.clip_range, f"clip_range >= 0 and adv_clip_max > 0 "
                f"(adv_clip_max={pg.adv_clip_max})")
    if m.sdpo is not None:
        s = m.sdpo
        if not 0 <= s.gamma <= 1:
            bad("model.sdpo.gamma", s.gamma, "a number in [0, 1]")
        if s.lam <= 0 or s.log_scale <= 0:
            bad("model.sdpo.lam", (s.lam, s.log_scale), "lam > 0 and log_scale > 0")
        if not s.eval_steps or any(n < 1 for n in s.eval_steps):
            bad("model.sdpo.eval_steps", s.eval_steps, "a non-empty list of integers >= 1")
    dv = m.diversity
    if dv.lpips_net not in ("alex", "vgg"):
        bad("model.diversity.lpips_net", dv.lpips_net, "alex or vgg")
    if dv.samples_per_prompt < 1:
        bad("model.diversity.samples_per_prompt", dv.samples_per_prompt, "an integer >= 1")
    elif dv.lpips_backbone_path and dv.samples_per_prompt < 2:
        bad("model.diversity.samples_per_prompt", dv.samples_per_prompt,
            ">= 2 when model.diversity.lpips_backbone_path is set (LPIPS compares images of one prompt)")
    if cfg.rm.name == "weighted_sum" and not cfg.rm.components:
        bad("rm.components", cfg.rm.components, "at least one reward when rm.name is weighted_sum")


def data_parallel_size(cfg: Config) -> int:
    """devices × num_nodes when devices is an int, else 0 (unknown until launch)."""
    d = cfg.trainer.devices
    if isinstance(d, int) and d > 0:
        return d * max(cfg.trainer.num_nodes, 1)
    return 0


def validate(raw: Dict) -> Config:
    """Typed config from a plain dict, or :class:`ConfigError` listing every problem."""
    problems: List[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: got {type(raw).__name__}, expected a mapping"])
    cfg = _build(Config, raw, "", problems)
    if cfg is not None:
        # Range checks run even when some keys were unknown or mistyped, so one attempt reports every
        # problem. A mistyped key fell back to its default: checks that mention it are left out.
        semantic: List[str] = []
        try:
            _check(cfg, semantic)
        except Exception:
            if not problems:
                raise
        broken = [p.split(":", 1)[0] for p in problems]
        problems.extend(p for p in semantic if not any(k and k in p for k in broken))
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(dict_config) -> Config:
    """From an OmegaConf DictConfig (interpolations resolved) or a plain dict."""
    from omegaconf import DictConfig, OmegaConf

    raw = OmegaConf.to_container(dict_config, resolve=True) if isinstance(dict_config, DictConfig) else dict_config
    return validate(raw)
