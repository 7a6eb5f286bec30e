"""The configuration: NeMo-Aligner's key names, one typed section class per YAML section.

Every section carries its own constraints (:func:`~..typed.setting`) and its cross-field rules
(``rules()``, on the lowest section that holds every field a rule relates); :func:`validate` builds the
tree from a plain dict and reports *every* problem at once with its dotted key. Algorithm sections
(``model.alignprop``, ``model.ddpo``, ...) are the core's own classes, and which of them and which
``trainer.<loop>`` sections exist comes from the algorithm registry; model families from the family
registry. Nothing downstream re-validates or copies these objects: the shell and the core read them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from ..algorithms.registry import ALGORITHMS, get_algorithm
from ..errors import ConfigError, InputError
from ..typed import Section, setting, validate_tree

PRECISIONS = ("32", "bf16-mixed", "16-mixed", "bf16", "16")


def _families():
    from ..backends.registry import FAMILIES

    return ["auto", *FAMILIES]


# --------------------------------------------------------------------------- trainer
@dataclass
class AlgoLoopConfig(Section):
    """``trainer.<loop>`` (``trainer.draftp_sd`` in NeMo-Aligner's files)."""

    max_epochs: int = setting(1, doc="caps the run at max_epochs passes over the train prompts (-1: no cap)")
    max_steps: int = setting(-1, doc="optimizer steps; -1: fall back to trainer.max_steps")
    val_check_interval: int = setting(0, ge=0, doc="validate every N optimizer steps (0: never)")
    save_interval: int = setting(0, ge=0, doc="checkpoint every N optimizer steps (0: only at the end)")
    limit_val_batches: int = setting(1, ge=0, doc="validation micro-batches per validation")
    gradient_clip_val: float = setting(0.0, ge=0, doc="clip the global grad norm (0: no clipping)")


@dataclass
class TrainerConfig(Section):
    devices: Union[int, str] = setting(1)
    num_nodes: int = setting(1, ge=1)
    accelerator: str = setting("auto", choices=("auto", "cpu", "gpu", "cuda"), expected="auto, cpu or gpu")
    strategy: str = setting("auto", choices=("auto", "ddp", "fsdp"))
    precision: Union[int, str] = setting(32)
    max_steps: int = setting(-1)
    log_every_n_steps: int = setting(1)

    @classmethod
    def extra_sections(cls) -> Dict[str, type]:
        return {a.loop_section: AlgoLoopConfig for a in ALGORITHMS.values()}

    def rules(self):
        d = self.devices
        if (isinstance(d, int) and d < 1 and d != -1) or (isinstance(d, str) and d != "auto"):
            yield "devices", f"got {d!r}, expected an integer >= 1, -1 or 'auto'"
        if str(self.precision) not in PRECISIONS:
            yield "precision", f"got {self.precision!r}, expected 32, bf16-mixed or 16-mixed"


def world_size(trainer: TrainerConfig) -> int:
    """Data-parallel processes: devices × num_nodes when devices is an integer (``-1``/``auto``: 1 until
    launch tells)."""
    d = trainer.devices
    return (d if isinstance(d, int) and d > 0 else 1) * max(trainer.num_nodes, 1)


def _known_world(trainer: TrainerConfig) -> int:
    d = trainer.devices
    return d * max(trainer.num_nodes, 1) if isinstance(d, int) and d > 0 else 0


# --------------------------------------------------------------------------- exp_manager
@dataclass
class CheckpointParams(Section):
    save_top_k: int = setting(1)
    save_last: bool = setting(True)
    filename: str = setting("step={step}")


@dataclass
class EMAConfig(Section):
    enable: bool = setting(False)
    decay: float = setting(0.999, gt=0, lt=1, expected="a number in (0, 1)")


@dataclass
class ExpManagerConfig(Section):
    explicit_log_dir: Optional[str] = setting(None)
    exp_dir: Optional[str] = setting(None)
    name: Optional[str] = setting(None)
    create_wandb_logger: bool = setting(False)
    create_tensorboard_logger: bool = setting(True)
    resume_if_exists: bool = setting(True)
    checkpoint_callback_params: CheckpointParams = setting(default_factory=CheckpointParams)
    ema: EMAConfig = setting(default_factory=EMAConfig)


# --------------------------------------------------------------------------- model
@dataclass
class InferConfig(Section):
    unconditional_guidance_scale: float = setting(7.5, ge=0)
    height: int = setting(512, gt=0, multiple_of=8, expected="a positive multiple of 8 (the VAE downsamples by 8)")
    width: int = setting(512, gt=0, multiple_of=8, expected="a positive multiple of 8 (the VAE downsamples by 8)")
    inference_steps: int = setting(50, ge=1)
    eta: float = setting(0.0, ge=0)
    vae_batch_size: int = setting(8, ge=1)
    sampler: str = setting("default", choices=("default", "ddim", "euler"),
                           doc="default: the model family's (ddim for SD, euler for SDXL)")


@dataclass
class LoraTuningConfig(Section):
    adapter_dim: int = setting(32, gt=0, expected="an integer > 0 (the LoRA rank)")
    network_alpha: float = setting(32.0, gt=0)
    target_modules: Optional[List[str]] = setting(None, doc="None: the peft_scheme's default targets")


@dataclass
class PeftConfig(Section):
    peft_scheme: str = setting("sdlora", choices=("sdlora", "lora", "none"))
    lora_tuning: LoraTuningConfig = setting(default_factory=LoraTuningConfig)


@dataclass
class SchedConfig(Section):
    warmup_steps: int = setting(0, ge=0)


@dataclass
class OptimConfig(Section):
    name: str = setting("adamw", choices=("adamw", "adam", "fused_adam"), doc="fused_adam: apex, when importable")
    lr: float = setting(1e-4, ge=0)
    weight_decay: float = setting(0.0)
    betas: List[float] = setting(default_factory=lambda: [0.9, 0.999])
    sched: SchedConfig = setting(default_factory=SchedConfig)

    def rules(self):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            yield "betas", f"got {self.betas}, expected two numbers in [0, 1)"


@dataclass
class DatasetConfig(Section):
    dataset_path: Optional[str] = setting(None, doc="a prompt file (.txt, .jsonl with \"prompt\") or builtin:<name>")


@dataclass
class DataConfig(Section):
    train: DatasetConfig = setting(default_factory=DatasetConfig)
    validation: DatasetConfig = setting(default_factory=DatasetConfig)
    max_prompt_chars: int = setting(1000, ge=1, doc="longer prompt lines are an error (the tokenizer truncates at 77 tokens)")

    def rules(self):
        if not self.train.dataset_path:
            yield "train.dataset_path", f"got {self.train.dataset_path!r}, expected a prompt file path or builtin:<name>"


@dataclass
class DiversityConfig(Section):
    """Per-prompt LPIPS diversity in validation (off unless a local backbone file is given)."""

    lpips_backbone_path: Optional[str] = setting(None, doc="torchvision AlexNet/VGG16 state dict (local file)")
    lpips_net: str = setting("alex", choices=("alex", "vgg"))
    samples_per_prompt: int = setting(1, ge=1, doc="validation images per prompt (LPIPS needs >= 2)")

    def rules(self):
        if self.lpips_backbone_path and self.samples_per_prompt < 2:
            yield "samples_per_prompt", (f"got {self.samples_per_prompt}, expected >= 2 when lpips_backbone_path is "
                                         f"set (LPIPS compares images of one prompt)")


@dataclass
class ModelConfig(Section):
    algorithm: str = setting("draftp", choices=lambda: list(ALGORITHMS))
    pretrained: Optional[str] = setting(None, doc="a local diffusers pipeline directory")
    family: str = setting("auto", choices=_families)
    seed: int = setting(1234)
    micro_batch_size: int = setting(1, ge=1)
    global_batch_size: int = setting(1, ge=1)
    kl_coeff: float = setting(1.0, ge=0)
    truncation_steps: int = setting(1)
    lv_copies: int = setting(0, ge=0, doc="DRaFT-LV: re-noised copies at the last step (0: off)")
    decode_target: str = setting("pred_x0", choices=("pred_x0", "x0"))
    sampler_checkpointing: bool = setting(False, doc="per-step gradient checkpointing of the sampler")
    activation_checkpointing: bool = setting(False, doc="activation checkpointing inside the denoiser")
    nan_tolerance: int = setting(5, ge=1, doc="stop after this many consecutive non-finite steps")
    infer: InferConfig = setting(default_factory=InferConfig)
    peft: PeftConfig = setting(default_factory=PeftConfig)
    optim: OptimConfig = setting(default_factory=OptimConfig)
    data: DataConfig = setting(default_factory=DataConfig)
    diversity: DiversityConfig = setting(default_factory=DiversityConfig)

    @classmethod
    def extra_sections(cls) -> Dict[str, type]:
        return {a.name: a.section_class() for a in ALGORITHMS.values() if a.section}

    def section(self):
        """This run's algorithm section (``model.<algorithm>``), or None."""
        return getattr(self, self.algorithm, None) if self.algorithm in type(self).extra_sections() else None

    def rules(self):
        if not self.pretrained:
            yield "pretrained", f"got {self.pretrained!r}, expected a local diffusers pipeline directory"
        steps = self.infer.inference_steps
        if not 1 <= self.truncation_steps <= max(steps, 1):
            yield "truncation_steps", (f"got {self.truncation_steps}, expected an integer in "
                                       f"[1, model.infer.inference_steps={steps}]")
        if self.lv_copies and self.truncation_steps != 1:
            yield "truncation_steps", f"got {self.truncation_steps}, expected 1 when model.lv_copies > 0 (DRaFT-LV is K=1)"
        if self.algorithm not in ALGORITHMS:
            return
        algo = get_algorithm(self.algorithm)
        sections = type(self).extra_sections()
        for other in sections:
            if other != self.algorithm and getattr(self, other) is not None:
                yield other, f"set, but model.algorithm is {self.algorithm!r}"
        own = self.section()
        if algo.section and own is None:
            yield self.algorithm, f"missing (model.algorithm={self.algorithm} needs it)"
        if algo.stochastic_sampler and self.infer.eta <= 0:
            yield "infer.eta", (f"got {self.infer.eta!r}, expected > 0 for {self.algorithm.upper()} "
                                f"(log-probabilities need a stochastic sampler)")
        tmb = getattr(own, "train_micro_batch_size", None)
        if tmb and self.micro_batch_size % tmb:
            yield f"{self.algorithm}.train_micro_batch_size", (
                f"got {tmb}, expected a divisor of model.micro_batch_size={self.micro_batch_size} "
                f"(one optimizer step per sample batch)")


# --------------------------------------------------------------------------- reward
@dataclass
class RMModelConfig(Section):
    restore_from_path: Optional[str] = setting(None)


@dataclass
class RewardComponent(Section):
    name: str = setting("")
    weight: float = setting(1.0)
    model: RMModelConfig = setting(default_factory=RMModelConfig)
    kwargs: Dict[str, Any] = setting(default_factory=dict)


@dataclass
class RMConfig(Section):
    name: str = setting("colorfulness", doc="a registered reward, weighted_sum, or package.module:callable")
    model: RMModelConfig = setting(default_factory=RMModelConfig)
    fp32: bool = setting(False, doc="run the reward model in fp32 under bf16 autocast")
    kwargs: Dict[str, Any] = setting(default_factory=dict, doc="passed to the reward factory")
    components: List[RewardComponent] = setting(default_factory=list, doc="for weighted_sum")

    def rules(self):
        if self.name == "weighted_sum" and not self.components:
            yield "components", f"got {self.components!r}, expected at least one reward when rm.name is weighted_sum"


@dataclass
class Config(Section):
    name: str = setting("draftp_sd")
    trainer: TrainerConfig = setting(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = setting(default_factory=ExpManagerConfig)
    model: ModelConfig = setting(default_factory=ModelConfig)
    rm: RMConfig = setting(default_factory=RMConfig)

    @property
    def algorithm(self):
        return get_algorithm(self.model.algorithm)

    @property
    def loop(self) -> AlgoLoopConfig:
        """The algorithm's own loop section (``trainer.draftp_sd`` for DRaFT+)."""
        return getattr(self.trainer, self.algorithm.loop_section)

    def rules(self):
        m, t = self.model, self.trainer
        world = _known_world(t)
        if world and m.global_batch_size % (m.micro_batch_size * world):
            yield "model.global_batch_size", (
                f"got {m.global_batch_size}, expected a multiple of model.micro_batch_size × data-parallel size = "
                f"{m.micro_batch_size} × {world} = {m.micro_batch_size * world}")
        if m.algorithm not in ALGORITHMS:
            return
        algo = get_algorithm(m.algorithm)
        loop = getattr(t, algo.loop_section)
        if loop is None:
            yield f"trainer.{algo.loop_section}", f"missing (model.algorithm={m.algorithm} needs its loop section)"
        else:
            steps = loop.max_steps if loop.max_steps > 0 else t.max_steps
            if steps <= 0 and loop.max_epochs <= 0:
                yield f"trainer.{algo.loop_section}.max_steps", "the run has no end (set max_steps or max_epochs > 0)"
        if algo.epoch_sampling and world and m.global_batch_size != m.micro_batch_size * world:
            yield "model.global_batch_size", (
                f"got {m.global_batch_size}, expected model.micro_batch_size × data-parallel size = "
                f"{m.micro_batch_size * world} for {m.algorithm} (samples per epoch are set by "
                f"model.{m.algorithm}.num_sample_batches)")


# --------------------------------------------------------------------------- entry points
def validate(raw: Dict) -> Config:
    """Typed config from a plain dict, or :class:`ConfigError` listing every problem."""
    tree, problems = validate_tree(Config, raw)
    if problems:
        raise ConfigError([InputError(k, m) for k, m in problems])
    return tree


def validate_model(raw: Dict) -> ModelConfig:
    """The ``model`` section alone (what a ``.nemo`` archive stores), or :class:`ConfigError`."""
    raw = {k: v for k, v in raw.items() if k not in ("target", "nemo_version")}  # NeMo adds these on save
    tree, problems = validate_tree(ModelConfig, raw, "model")
    if problems:
        raise ConfigError([InputError(k, m) for k, m in problems])
    return tree


def load_config(dict_config) -> Config:
    """From an OmegaConf DictConfig (interpolations resolved) or a plain dict."""
    from omegaconf import DictConfig, OmegaConf

    raw = OmegaConf.to_container(dict_config, resolve=True) if isinstance(dict_config, DictConfig) else dict_config
    return validate(raw)
