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
from . import nemo_aligner as na

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
    notices = na.TRAINER_NOTICES

    devices: Union[int, str] = setting(1)
    num_nodes: int = setting(1, ge=1)
    accelerator: str = setting("auto", choices=("auto", "cpu", "gpu", "cuda"), expected="auto, cpu or gpu")
    strategy: str = setting("auto", choices=("auto", "ddp", "fsdp"))
    precision: Union[int, str] = setting(32, aliases=("model.precision", "model.trainer.precision"))
    max_steps: int = setting(-1)
    log_every_n_steps: int = setting(1)
    benchmark: bool = setting(False, doc="cudnn.benchmark (Lightning's Trainer(benchmark=...))")
    enable_model_summary: bool = setting(False, doc="print Lightning's model summary at the start")

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
    notices = na.CHECKPOINT_NOTICES

    save_top_k: int = setting(1)
    save_last: bool = setting(True)
    filename: str = setting("step={step}", doc="checkpoint file name; {step}, {consumed_samples} and the "
                                                "monitored metric may appear in it")
    monitor: str = setting("train_loss", choices=("train_loss", "reduced_train_loss"),
                           doc="the metric ranking checkpoints (reduced_train_loss: NeMo-Aligner's name for it)")


@dataclass
class EMAConfig(Section):
    enable: bool = setting(False)
    decay: float = setting(0.999, gt=0, lt=1, expected="a number in (0, 1)")
    validate_original_weights: bool = setting(False, doc="NeMo's EMA: validate with the live, not the EMA, weights")
    every_n_steps: int = setting(1, ge=1, doc="NeMo's EMA: update every N optimizer steps")
    cpu_offload: bool = setting(False, doc="NeMo's EMA: keep the EMA copy in CPU memory")


@dataclass
class ExpManagerConfig(Section):
    notices = na.EXP_MANAGER_NOTICES

    explicit_log_dir: Optional[str] = setting(None)
    exp_dir: Optional[str] = setting(None)
    name: Optional[str] = setting(None)
    create_wandb_logger: bool = setting(False)
    wandb_logger_kwargs: Dict[str, Any] = setting(default_factory=dict, doc="passed to Lightning's WandbLogger "
                                                  "(project, name, resume, offline, ...)")
    create_tensorboard_logger: bool = setting(True)
    resume_if_exists: bool = setting(True)
    resume_ignore_no_checkpoint: bool = setting(True, doc="resume_if_exists with no checkpoint yet starts fresh")
    checkpoint_callback_params: CheckpointParams = setting(default_factory=CheckpointParams)
    ema: EMAConfig = setting(default_factory=EMAConfig)


# --------------------------------------------------------------------------- model
@dataclass
class InferConfig(Section):
    notices = na.INFER_NOTICES
    _res = "a positive multiple of 8 (the VAE downsamples by 8)"

    unconditional_guidance_scale: float = setting(7.5, ge=0, aliases=("model.sampling.base.scale",))
    height: int = setting(512, gt=0, multiple_of=8, expected=_res, aliases=("model.sampling.base.height",))
    width: int = setting(512, gt=0, multiple_of=8, expected=_res, aliases=("model.sampling.base.width",))
    inference_steps: int = setting(50, ge=1, aliases=("model.sampling.base.steps",))
    eta: float = setting(0.0, ge=0)
    vae_batch_size: int = setting(8, ge=1)
    sampler: str = setting("default", choices=("default", "ddim", "euler", "flow"),
                           aliases={"sampler_type": na.sampler_type, "model.sampling.base.sampler": na.sdxl_sampler},
                           doc="default: the model family's (ddim for SD, euler for SDXL)")
    down_factor: Optional[int] = setting(None, doc="checked against the VAE's downsampling factor")


@dataclass
class LoraTuningConfig(Section):
    notices = na.LORA_NOTICES

    adapter_dim: int = setting(32, gt=0, expected="an integer > 0 (the LoRA rank)")
    network_alpha: Optional[float] = setting(32.0, gt=0, aliases=("model.unet_config.lora_network_alpha",),
                                             doc="ΔW = (network_alpha / adapter_dim)·B A; null: NeMo's default")
    target_modules: Optional[List[str]] = setting(None, doc="None: the peft_scheme's default targets")
    adapter_dropout: float = setting(0.0, ge=0, lt=1, doc="dropout on the adapter's output (NeMo's position 'post')")
    column_init_method: str = setting("xavier", choices=("xavier", "normal", "kaiming", "zero"),
                                      doc="initialisation of the down projection A (NeMo's linear_in; kaiming is "
                                          "peft's own LoRA init)")
    row_init_method: str = setting("zero", choices=("xavier", "normal", "kaiming", "zero"),
                                   doc="initialisation of the up projection B (NeMo's linear_out)")


@dataclass
class PeftConfig(Section):
    peft_scheme: str = setting("sdlora", choices=("sdlora", "lora", "none"))
    restore_from_path: Optional[str] = setting(None, doc="initial adapter weights: a NeMo-Aligner LoRA .nemo or .ckpt")
    lora_tuning: LoraTuningConfig = setting(default_factory=LoraTuningConfig)


@dataclass
class SchedConfig(Section):
    notices = {"hold_steps": na.Notice("WarmupHoldPolicy keeps the peak learning rate after warmup whatever "
                                       "hold_steps is (NeMo's WarmupHoldPolicy._get_lr returns the base rate)")}

    name: str = setting("linear_warmup", choices=("linear_warmup", "WarmupHoldPolicy"),
                        doc="linear_warmup: lr·min(1, (s+1)/warmup); WarmupHoldPolicy: NeMo's, lr·(s+1)/(warmup+1)")
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
    dataset_path: Optional[str] = setting(None, convert=na.dataset_paths,
                                          doc="a prompt file (.txt, .jsonl with \"prompt\"), webdataset tar(s) of "
                                              "prompts, or builtin:<name>")


@dataclass
class TrainDatasetConfig(DatasetConfig):
    dataset_path: Optional[str] = setting(None, convert=na.dataset_paths, aliases={
        "model.data.webdataset.local_root_path": na.optional_path,
        "model.data.train.webdataset.local_root_path": na.optional_path},
        doc="a prompt file (.txt, .jsonl with \"prompt\"), webdataset tar(s) of prompts, or builtin:<name>")


@dataclass
class WebDatasetConfig(Section):
    """NeMo-Aligner's ``model.data.webdataset``; its ``local_root_path`` sets ``model.data.train.dataset_path``."""

    infinite_sampler: bool = setting(False, doc="repeat the prompts without an epoch cap (trainer.*.max_epochs)")


@dataclass
class DataConfig(Section):
    notices = {"shuffle_data": na.Notice("NeMo-Aligner's DRaFT+ loader shuffles whatever this says (its random "
                                         "batch sampler); the prompts are reshuffled every epoch here too, seeded "
                                         "by model.seed")}

    train: TrainDatasetConfig = setting(default_factory=TrainDatasetConfig)
    validation: DatasetConfig = setting(default_factory=DatasetConfig, doc="null: validate on the train prompts")
    max_prompt_chars: int = setting(1000, ge=1, doc="longer prompt lines are an error (the tokenizer truncates at 77 tokens)")
    num_workers: int = setting(0, ge=0, doc="DataLoader worker processes")
    webdataset: WebDatasetConfig = setting(default_factory=WebDatasetConfig)

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
    notices = na.MODEL_NOTICES

    algorithm: str = setting("draftp", choices=lambda: list(ALGORITHMS))
    pretrained: Optional[str] = setting(None, doc="a local diffusers pipeline directory (or the NeMo parts below)")
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
    # NeMo-Aligner's way to give the model: its parts, with the architecture from these keys
    unet_config: Optional[na.UnetConfig] = setting(None)
    first_stage_config: Optional[na.FirstStageConfig] = setting(None)
    cond_stage_config: Optional[na.CondStageConfig] = setting(None)
    conditioner_config: Optional[na.ConditionerConfig] = setting(None)
    sampling: Optional[na.SamplingConfig] = setting(None)
    # the noise schedule and latent scale of NeMo's LatentDiffusion (with model.pretrained: checked
    # against the pipeline's scheduler and VAE)
    linear_start: Optional[float] = setting(None, gt=0)
    linear_end: Optional[float] = setting(None, gt=0)
    timesteps: Optional[int] = setting(None, ge=1)
    beta_schedule: Optional[str] = setting(None, choices=(None, "linear", "sqrt_linear", "cosine"),
                                           doc="NeMo's LDM names: 'linear' is linear in √β (diffusers' scaled_linear)")
    parameterization: Optional[str] = setting(None, choices=(None, "eps", "v"))
    scale_factor: Optional[float] = setting(None, gt=0, doc="the VAE latent scale")
    scale_by_std: bool = setting(False, doc="must be false: model.scale_factor is used as given")
    cosine_s: Optional[float] = setting(None, doc="the offset of beta_schedule cosine")
    given_betas: Optional[List[float]] = setting(None, doc="an explicit β schedule (NeMo parts only)")
    image_size: Optional[int] = setting(None, doc="the latent size the UNet is configured for (its sample_size)")
    denoiser_config: Optional[Dict[str, Any]] = setting(None, doc="SDXL's denoiser: its scaling (Eps/V) sets the "
                                                                   "prediction type, its discretization the σs")
    disable_first_stage_autocast: Optional[bool] = setting(None, doc="SDXL: decode in fp32 (the VAE's force_upcast)")
    resume_from_checkpoint: Optional[str] = setting(None, doc="a training checkpoint to resume from")
    gradient_as_bucket_view: bool = setting(True, doc="DDP: gradients as views into the all-reduce buckets")
    fsdp: bool = setting(False, doc="NeMo's SD switch: true shards the UNet with FSDP (= trainer.strategy=fsdp)")

    @classmethod
    def extra_sections(cls) -> Dict[str, type]:
        return {a.name: a.section_class() for a in ALGORITHMS.values() if a.section}

    @property
    def from_nemo_parts(self) -> bool:
        """The model is given as NeMo-Aligner gives it (model.unet_config.from_pretrained), not as a pipeline."""
        return self.unet_config is not None and self.unet_config.from_pretrained is not None

    def section(self):
        """This run's algorithm section (``model.<algorithm>``), or None."""
        return getattr(self, self.algorithm, None) if self.algorithm in type(self).extra_sections() else None

    def rules(self):
        if not self.pretrained and not self.from_nemo_parts:
            yield "pretrained", (f"got {self.pretrained!r}, expected a local diffusers pipeline directory (or "
                                 f"NeMo-Aligner's model.unet_config.from_pretrained)")
        if self.pretrained and self.from_nemo_parts:
            yield "unet_config.from_pretrained", ("set together with model.pretrained: give the model either as a "
                                                  "diffusers pipeline directory or as NeMo parts")
        if self.from_nemo_parts and (self.first_stage_config is None or not self.first_stage_config.from_pretrained):
            yield "first_stage_config.from_pretrained", "missing: NeMo parts need the VAE as well as the UNet"
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
    restore_from_path: Optional[str] = setting(None, doc="the reward's weights: a local directory or file, or "
                                                        "NeMo-Aligner's reward-model .nemo")


@dataclass
class RewardComponent(Section):
    name: str = setting("")
    weight: float = setting(1.0)
    model: RMModelConfig = setting(default_factory=RMModelConfig)
    kwargs: Dict[str, Any] = setting(default_factory=dict)


@dataclass
class RMConfig(Section):
    notices = na.RM_NOTICES

    name: Optional[str] = setting(None, doc="a registered reward, weighted_sum, or package.module:callable; "
                                            "null: NeMo-Aligner's CLIP reward model when rm.model.restore_from_path "
                                            "is a .nemo")
    model: RMModelConfig = setting(default_factory=RMModelConfig)
    fp32: bool = setting(False, aliases={"rm.model.precision": na.rm_precision},
                         doc="run the reward model in fp32 under bf16 autocast")
    kwargs: Dict[str, Any] = setting(default_factory=dict, doc="passed to the reward factory")
    components: List[RewardComponent] = setting(default_factory=list, doc="for weighted_sum")

    @property
    def reward_name(self) -> str:
        """``name``, or NeMo-Aligner's reward model (``nemo_clip``) for a ``.nemo`` restore_from_path."""
        path = self.model.restore_from_path or ""
        if path.endswith(".nemo") and self.name in (None, "pickscore"):
            return "nemo_clip"  # NeMo-Aligner's PickScore-style reward model, as its rm.model.restore_from_path gives it
        return self.name or ""

    def rules(self):
        if not self.reward_name:
            yield "name", ("missing: a reward name (e.g. pickscore, aesthetic, brightness), or NeMo-Aligner's reward "
                           "model .nemo in rm.model.restore_from_path")
        if self.name == "weighted_sum" and not self.components:
            yield "components", f"got {self.components!r}, expected at least one reward when rm.name is weighted_sum"


@dataclass
class SoupConfig(Section):
    """``soup``: how ``nad-generate --config-name`` mixes the two LoRAs of ``--soup-lora A B`` (AlignProp's
    ``evaluate_soup``); training does not read it."""

    alpha: float = setting(0.5, ge=0, le=1, expected="a number in [0, 1]",
                           doc="nad-generate: weight of the first --soup-lora adapter (AlignProp's mixing_coef_1)")
    mode: str = setting("delta", choices=("delta", "factors"),
                        doc="nad-generate: delta mixes ΔW linearly; factors interpolates A and B (AlignProp's "
                            "mixing: ΔW = α²·ΔW_A against the base)")


@dataclass
class Config(Section):
    notices = na.ROOT_NOTICES

    name: str = setting("draftp_sd")
    # NeMo-Aligner's anneal_sdxl.py (AIG inference) reads these two from the root (+prompt=…, +weight_type=…)
    prompt: Optional[str] = setting(None, doc="anneal_sdxl.py: render this prompt instead of the validation prompts")
    weight_type: Optional[str] = setting(None, doc="anneal_sdxl.py: comma-separated AIG weight schedules")
    soup: SoupConfig = setting(default_factory=SoupConfig)
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
        if m.fsdp and t.strategy not in ("auto", "fsdp"):
            yield "model.fsdp", f"true asks for FSDP, but trainer.strategy is {t.strategy!r} (set one of them)"
        if (t.strategy == "fsdp" or m.fsdp) and self.exp_manager.ema.enable:
            yield "exp_manager.ema.enable", ("not supported with trainer.strategy=fsdp (NeMo's EMA swaps whole "
                                             "weights in and out of the optimizer; the sharded path does not "
                                             "carry it): set it to false, or use trainer.strategy=ddp")
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
    """Typed config from a plain dict, or :class:`ConfigError` listing every problem. The keys accepted
    with a notice are ``tree.notices_given``: (key, why it has no effect here)."""
    notices: List = []
    tree, problems = validate_tree(Config, raw, notices=notices)
    if problems:
        raise ConfigError([InputError(k, m) for k, m in problems])
    object.__getattribute__(tree, "__dict__")["notices_given"] = notices
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
