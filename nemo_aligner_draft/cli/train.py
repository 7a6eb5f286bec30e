"""Training entry point (``examples/mm/stable_diffusion/train_sd_draftp.py`` and ``nad-train``).

Usage, as NeMo-Aligner::

    python examples/mm/stable_diffusion/train_sd_draftp.py --config-path=conf --config-name=draftp_sd \
        model.pretrained=/models/sd15 rm.model.restore_from_path=/models/pickscore trainer.devices=8

Order of work: compose (Hydra overrides) → validate every key → check every path and load the
prompts → build the reward and the model → only then create the run directory (exp_manager) and
train. Bad input therefore exits with one message and leaves no run directory behind.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from ..config.schema import world_size
from ..errors import InputError, attributed, describe, report
from ..files import atomic_write_text

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A checkout keeps the configs at the top (conf/); an installed wheel carries them in the package.
REPO_CONF = next((d for d in (os.path.join(_PACKAGE, "conf"), os.path.join(os.path.dirname(_PACKAGE), "conf"))
                  if os.path.isdir(d)), os.path.join(_PACKAGE, "conf"))
EXIT_DIVERGED = 3  # model.nan_tolerance consecutive non-finite steps

log = logging.getLogger("nemo_aligner_draft")


def compose(config_path: str, config_name: str, overrides: List[str]):
    """Hydra composition of ``config_name`` in ``config_path`` with ``overrides``. Every failure is an
    :class:`InputError` naming what caused it: the flag, the override, or ``file:line`` of a YAML error."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config_dir = os.path.abspath(config_path)
    if not os.path.isdir(config_dir):
        raise InputError("--config-path", f"{config_path!r} is not a directory")
    name = config_name.removesuffix(".yaml")
    if not os.path.isfile(os.path.join(config_dir, name + ".yaml")):
        known = sorted(f[:-5] for f in os.listdir(config_dir) if f.endswith(".yaml"))
        raise InputError("--config-name", f"no {name}.yaml in {config_dir} (there: {', '.join(known) or 'none'})")
    parser = OverridesParser.create()
    overrides = list(overrides)
    for i, override in enumerate(overrides):  # one at a time, so the message names the override that is malformed
        try:
            parsed = parser.parse_overrides([override])[0]
        except Exception as e:
            raise InputError(override, _first_line(e)) from None
        if parsed.is_sweep_override():
            # `key=a,b,c` is a multirun sweep to Hydra, and an error without --multirun; nothing here sweeps,
            # and NeMo-Aligner's guide writes +weight_type='draft,base,power_2.0' (the shell drops the quotes)
            # meaning the string: take it as the string
            key, _, value = override.partition("=")
            overrides[i] = f"{key}={_quote(value)}"
    log.info(f"config: {os.path.join(config_dir, name + '.yaml')}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            overrides = _add_missing_keys(hydra_compose(config_name=name), overrides)
            return hydra_compose(config_name=name, overrides=list(overrides))
    except Exception as e:
        raise _composition_error(e, overrides) from None
    finally:
        GlobalHydra.instance().clear()


def _validated(load_config, dict_cfg):
    """The typed config; an interpolation that does not resolve is an error of the key that holds it."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return load_config(dict_cfg)
    except OmegaConfBaseException as e:
        raise InputError(str(getattr(e, "full_key", "") or "--config-name"), _first_line(e)) from None


def _add_missing_keys(base, overrides: List[str]) -> List[str]:
    """Hydra refuses to override a key the file does not have unless it is written ``+key=value``. A key the
    typed config accepts (NeMo-Aligner's documented ``model.data.train.webdataset.local_root_path`` is not in
    its own draftp_sd.yaml, for one) gets the ``+`` it needs; anything else is left to Hydra's message."""
    from omegaconf import OmegaConf

    from ..config.keys import accepted_key

    def present(key: str) -> bool:  # a ??? value is present (OmegaConf.select would call it missing)
        node = base
        for part in key.split("."):
            if not OmegaConf.is_dict(node) or part not in node.keys():
                return False
            node = node._get_node(part)
        return True

    out = []
    for o in overrides:
        key, sep, _ = o.partition("=")
        if sep and not key.startswith(("+", "~")) and not present(key) and accepted_key(key):
            o = "+" + o
        out.append(o)
    return out


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _composition_error(e: BaseException, overrides: List[str]) -> InputError:
    """What Hydra/OmegaConf/YAML raised while composing, as an InputError with the key that caused it."""
    import re

    import yaml

    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, yaml.MarkedYAMLError):
            mark = err.problem_mark or err.context_mark
            where = f"{mark.name}:{mark.line + 1}" if mark is not None else "yaml"
            what = " ".join(x for x in (err.context, err.problem) if x)
            return InputError(where, f"YAML syntax error: {what}")
    text = _first_line(e)
    m = re.search(r"override '([^']+)'", text) or re.search(r"[Kk]ey '([^']+)'", text)
    if m:
        key = m.group(1)
        override = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
        return InputError(key, f"{text}" + (f" (from the override {override!r})" if override else ""))
    full_key = getattr(e, "full_key", None)
    if full_key:
        return InputError(str(full_key), text)
    return InputError("--config-name", text)


def parse_args(argv: Optional[List[str]] = None, default_config: str = "draftp_sd"):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--config-path", "-cp", default=REPO_CONF)
    p.add_argument("--config-name", "-cn", default=default_config)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    return p.parse_args(argv)


def preflight(cfg) -> dict:
    """Check every path and input before anything is created; return the loaded prompts and reward.

    Each step runs under :func:`attributed` with the key whose value it acts on, so whatever goes wrong
    in it (ours or a library's) is reported as an :class:`InputError` of that key."""
    from ..backends import detect_family
    from ..data.source import open_prompt_source
    from ..rewards.base import Reward

    m = cfg.model
    if m.from_nemo_parts:  # NeMo-Aligner's parts: their files are checked when the model is built, before any run dir
        family = m.family
    else:
        with attributed("model.pretrained", "a diffusers pipeline", m.pretrained):
            family = detect_family(m.pretrained)
    if m.family not in ("auto", family):
        raise InputError("model.family", f"got {m.family!r}, but model.pretrained={m.pretrained!r} holds a "
                                         f"{family!r}-family pipeline (model_index.json); use model.family=auto")
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("trainer.accelerator", f"got {cfg.trainer.accelerator!r}, but no CUDA device is "
                                                    f"visible to torch (use cpu or auto)")
    lpips_path = m.diversity.lpips_backbone_path
    if lpips_path is not None and not os.path.isfile(lpips_path):
        raise InputError("model.diversity.lpips_backbone_path", f"{lpips_path!r} does not exist "
                         f"(expected a local torchvision AlexNet/VGG16 state dict file)")
    key = "model.data.train.dataset_path"
    with attributed(key, "prompts", m.data.train.dataset_path):
        train = open_prompt_source(m.data.train.dataset_path, key, m.data.max_prompt_chars)  # list or webdataset
    world = world_size(cfg.trainer)
    pg = m.section() if cfg.algorithm.epoch_sampling else None
    if pg is not None:
        per_rank, how = pg.prompts_per_epoch(m.micro_batch_size)
        if len(train) < per_rank * world:
            raise InputError(f"model.{m.algorithm}.num_sample_batches",
                             f"one PPO epoch draws {how} × data-parallel size = {per_rank * world} prompts, but {key} "
                             f"has only {len(train)}")
    elif len(train) < m.micro_batch_size * world:
        raise InputError(key, f"{len(train)} prompt(s), fewer than one round of model.micro_batch_size × "
                              f"data-parallel size = {m.micro_batch_size} × {world}")
    val = None
    if m.data.validation.dataset_path:
        key = "model.data.validation.dataset_path"
        with attributed(key, "prompts", m.data.validation.dataset_path):
            val = open_prompt_source(m.data.validation.dataset_path, key, m.data.max_prompt_chars)
    reward = build_reward_from_config(cfg.rm)
    if not reward.differentiable and cfg.algorithm.differentiable_reward:
        raise InputError("rm.name", f"reward {reward.name!r} is not differentiable; model.algorithm={m.algorithm} "
                                    f"backpropagates through the reward (use ddpo or sdpo, or a differentiable reward)")
    assert isinstance(reward, Reward)
    with attributed("rm.name", "the reward"):
        probe_reward(reward, cfg)
    resume = m.resume_from_checkpoint
    if resume and not os.path.isfile(resume):
        raise InputError("model.resume_from_checkpoint", f"{resume!r} does not exist")
    check_run_dir(cfg)
    return {"train": train, "val": val, "reward": reward}


def check_run_dir(cfg) -> None:
    """The run directory can be created (or, on resume, written): checked before anything exists."""
    e = cfg.exp_manager
    key = "exp_manager.explicit_log_dir" if e.explicit_log_dir else ("exp_manager.exp_dir" if e.exp_dir else
                                                                     "exp_manager.exp_dir (default ./nemo_experiments)")
    path = os.path.abspath(planned_log_dir(cfg))
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(key, f"{path!r} exists and is not a directory")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise InputError(key, f"cannot create the run directory {path!r}: {probe!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(key, f"cannot create the run directory {path!r}: {probe!r} is not writable")


def probe_reward(reward, cfg) -> None:
    """Score two mid-grey images once, so a reward returning the wrong shape or dtype fails here,
    before any run directory exists, rather than at the first training step. Non-finite values are
    left to the NaN guard: a reward may be NaN only on some images."""
    import torch

    from ..rewards.base import check_reward_output

    inf = cfg.model.infer
    images = torch.full((2, 3, inf.height, inf.width), 0.5)
    with torch.no_grad():
        out = reward(images, [getattr(reward, "probe_prompt", "a photo")] * 2)
    check_reward_output(out, 2, reward.name)


def build_reward_from_config(rm):
    from ..rewards import build_reward
    from ..rewards.base import resolve_factory

    path = rm.model.restore_from_path
    if path is not None and not os.path.exists(path):
        raise InputError("rm.model.restore_from_path", f"{path!r} does not exist")
    kwargs = dict(rm.kwargs)
    if rm.components and rm.name != "weighted_sum":
        raise InputError("rm.components", f"{len(rm.components)} rewards listed, but rm.name is {rm.name!r}; "
                                          f"components are only used with rm.name=weighted_sum")
    name = rm.reward_name
    with attributed("rm.name"):
        resolve_factory(name)
    if rm.name == "weighted_sum":
        kwargs["components"] = [
            {"name": c.name, "weight": c.weight, "path": c.model.restore_from_path, "kwargs": dict(c.kwargs)}
            for c in rm.components
        ]
        for i, c in enumerate(rm.components):
            with attributed(f"rm.components[{i}].name"):
                resolve_factory(c.name)
            if c.model.restore_from_path is not None and not os.path.exists(c.model.restore_from_path):
                raise InputError(f"rm.components[{i}].model.restore_from_path",
                                 f"{c.model.restore_from_path!r} does not exist")
    # rm.fp32 keeps the reward's weights and inputs in fp32 and outside autocast
    if rm.name == "weighted_sum":
        key = "rm.components"
    else:
        key = "rm.model.restore_from_path" if path else ("rm.kwargs" if kwargs else "rm.name")
    with attributed(key, "the reward", path):
        return build_reward(name, path=path, fp32=rm.fp32, **kwargs)


# Set to a directory to have every rank write its trainable parameters, prompts and first latents
# there at the end of training (the multi-process tests compare ranks and layouts with it).
RANK_DUMP_ENV = "NAD_RANK_DUMP_DIR"


def build_trainer(cfg, max_steps: int, accumulation: int):
    from lightning.pytorch import Trainer

    from ..models.checkpoint_io import AtomicCheckpointIO

    t, loop = cfg.trainer, cfg.loop
    accelerator = "gpu" if t.accelerator == "cuda" else t.accelerator
    strategy = build_strategy(t, accelerator, cfg.model.gradient_as_bucket_view, fsdp=cfg.model.fsdp)
    val_every = loop.val_check_interval * accumulation if loop.val_check_interval > 0 else None
    precision = t.precision if str(t.precision) != "32" else "32-true"
    callbacks = []
    if os.environ.get(RANK_DUMP_ENV):
        from ..models.distributed import RankDump

        callbacks.append(RankDump(os.environ[RANK_DUMP_ENV]))
    try:
        return Trainer(
            callbacks=callbacks, accelerator=accelerator, devices=t.devices, num_nodes=t.num_nodes,
            strategy=strategy, precision=precision, max_steps=max_steps, max_epochs=-1, logger=False,
            enable_checkpointing=False, use_distributed_sampler=False, val_check_interval=val_every,
            check_val_every_n_epoch=None, limit_val_batches=loop.limit_val_batches if val_every else 0,
            num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, plugins=[AtomicCheckpointIO()],
            enable_model_summary=t.enable_model_summary, benchmark=t.benchmark)
    except Exception as e:  # Lightning refuses a combination: blame the trainer key its message names
        text = str(e).lower()
        words = {"accelerator": ("accelerator", "gpu", "cuda", "mps"), "devices": ("devices",),
                 "num_nodes": ("num_nodes", "nodes"), "strategy": ("strategy",), "precision": ("precision",)}
        key = next((f"trainer.{k}" for k, ws in words.items() if any(w in text for w in ws)), "trainer")
        raise InputError(key, describe(e)) from e


def build_strategy(t, accelerator: str, gradient_as_bucket_view: bool = True, fsdp: bool = False):
    """Lightning strategy for ``trainer.strategy``: DDP (gloo on CPU, NCCL on GPU) whenever the world
    has more than one process, sharded FSDP on request (models/fsdp.py). The gradient all-reduce or
    reduce-scatter is the strategy's, never ours."""
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_gpu else "gloo"
    if t.strategy == "fsdp" or fsdp:  # model.fsdp: NeMo's SD switch for the same thing
        # FSDP2 by network block (models/fsdp.py), on GPUs (NCCL) and on CPU (gloo) alike; activation
        # checkpointing stays the model's own (model.activation_checkpointing)
        from ..models.fsdp import make_strategy

        return make_strategy(world_size(t), backend)
    if t.strategy == "ddp" or (t.strategy == "auto" and world_size(t) > 1):
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=False,
                           gradient_as_bucket_view=gradient_as_bucket_view)
    return t.strategy


def exp_manager_config(cfg) -> dict:
    e, loop, run_name = cfg.exp_manager, cfg.loop, cfg.name
    ckpt = e.checkpoint_callback_params
    monitor = ckpt.monitor
    # NeMo-Aligner names a run's W&B run and project after the config's name unless told otherwise
    wandb = {"name": e.name or run_name, "project": run_name, **e.wandb_logger_kwargs}
    return {
        "explicit_log_dir": e.explicit_log_dir,
        "exp_dir": e.exp_dir,
        "name": e.name or run_name,
        "use_datetime_version": False,
        "create_wandb_logger": e.create_wandb_logger,
        "wandb_logger_kwargs": wandb if e.create_wandb_logger else None,
        "create_tensorboard_logger": e.create_tensorboard_logger,
        "resume_if_exists": e.resume_if_exists,
        "resume_ignore_no_checkpoint": e.resume_ignore_no_checkpoint,
        "log_step_timing": False,
        "log_tflops_per_sec_per_gpu": False,
        "create_preemption_callback": False,
        "seconds_to_sleep": 0,
        "checkpoint_callback_params": {
            "monitor": monitor,
            "mode": "min",  # train_loss and reduced_train_loss are losses
            "save_top_k": ckpt.save_top_k,
            "save_last": ckpt.save_last,
            "filename": ckpt.filename,
            "auto_insert_metric_name": False,
            "every_n_train_steps": loop.save_interval if loop.save_interval > 0 else None,
            "every_n_epochs": 0,
            "save_on_train_epoch_end": False,
            "always_save_nemo": False,
            "save_nemo_on_train_end": True,
        },
        "ema": {"enable": e.ema.enable, "decay": e.ema.decay, "validate_original_weights": e.ema.validate_original_weights,
                "every_n_steps": e.ema.every_n_steps, "cpu_offload": e.ema.cpu_offload},
    }


def run(cfg, dict_cfg) -> str:
    """Train from a validated config; returns the run directory."""
    import torch
    from omegaconf import OmegaConf

    from ..models.base import AlignmentModel, effective_max_steps
    from ..models.callbacks import TrainingReport

    from ..models.distributed import enable_tf32

    inputs = preflight(cfg)
    torch.manual_seed(cfg.model.seed)
    if enable_tf32():
        log.info("TF32 matmuls and convolutions on (an Ampere or newer GPU), as NeMo-Aligner sets them")
    accumulation = max(cfg.model.global_batch_size // (cfg.model.micro_batch_size * world_size(cfg.trainer)), 1)
    max_steps = effective_max_steps(cfg.loop, cfg.trainer.max_steps, len(inputs["train"]), cfg.model.global_batch_size,
                                    infinite=cfg.model.data.webdataset.infinite_sampler)
    # The model attributes each step of its construction to the key it acts on (models/base.py);
    # "model" is the fallback for what no step claims.
    with attributed("model"):
        model = AlignmentModel(cfg=OmegaConf.create(OmegaConf.to_container(dict_cfg.model, resolve=True)),
                               config=cfg.model, loop=cfg.loop, reward=inputs["reward"], train_prompts=inputs["train"],
                               val_prompts=inputs["val"], precision=cfg.trainer.precision)
    with attributed("model.diversity.lpips_backbone_path", "the LPIPS backbone",
                    cfg.model.diversity.lpips_backbone_path):
        report = TrainingReport(None, **diversity_metrics(cfg.model.diversity, inputs["reward"]))
    trainer = build_trainer(cfg, max_steps, accumulation)
    from nemo.utils.exp_manager import exp_manager

    run_dir_key = "exp_manager.explicit_log_dir" if cfg.exp_manager.explicit_log_dir else "exp_manager.exp_dir"
    with attributed(run_dir_key):
        if cfg.exp_manager.resume_if_exists:
            from ..models.checkpoint_io import tidy_checkpoint_dir

            for moved in tidy_checkpoint_dir(os.path.join(planned_log_dir(cfg), "checkpoints")):
                log.warning(f"resume: set aside {moved} (left over from an interrupted run)")
        log_dir = str(exp_manager(trainer, exp_manager_config(cfg)))
        if trainer.is_global_zero:  # one writer: rank 0's exp_manager may still be moving a previous run's files
            atomic_write_text(os.path.join(log_dir, "config.yaml"), OmegaConf.to_yaml(dict_cfg))
    report.log_dir = log_dir
    trainer.callbacks.append(report)
    model.set_trainer(trainer)
    trainer.fit(model, ckpt_path=cfg.model.resume_from_checkpoint or getattr(trainer, "ckpt_path", None))
    from ..models import fsdp

    whole = None  # the trained network's state dict for the export: gathered by every rank when sharded
    if fsdp.is_sharded(model.backend.net) and cfg.model.peft.peft_scheme != "none":
        whole = fsdp.full_state_dict(model.backend.net)
    if trainer.is_global_zero and cfg.model.peft.peft_scheme != "none":
        from ..backends import get_family

        if get_family(model.backend.family).pipeline_class:
            from ..export.lora import export_lora

            export_lora(model.backend.net, os.path.join(log_dir, "export"), family=model.backend.family,
                        state_dict=whole)
        else:
            log.info(f"model family {model.backend.family!r} has no diffusers pipeline: no LoRA export "
                     f"(the .nemo and the checkpoints hold the adapters)")
    return log_dir


def planned_log_dir(cfg) -> str:
    """The run directory exp_manager will use (explicit_log_dir, else <exp_dir or ./nemo_experiments>/<name>)."""
    e = cfg.exp_manager
    if e.explicit_log_dir:
        return e.explicit_log_dir
    return os.path.join(e.exp_dir or os.path.join(os.getcwd(), "nemo_experiments"), e.name or cfg.name)


def diversity_metrics(dv, reward) -> dict:
    """Validation diversity, base vs fine-tuned: per-prompt LPIPS when ``model.diversity.lpips_backbone_path``
    is set; and, when the reward exposes ``image_embeddings`` (CLIP-type rewards), the mean pairwise
    cosine distance of the validation images' embeddings, over all of them and, when validation renders
    each prompt ``model.diversity.samples_per_prompt`` >= 2 times, per prompt (``prompt_diversity``).
    Keyword arguments of :class:`TrainingReport`."""
    out = {}
    if dv.lpips_backbone_path is not None:
        from ..metrics.diversity import LpipsDiversity

        out["lpips"] = LpipsDiversity(net=dv.lpips_net, backbone_path=dv.lpips_backbone_path)
    if callable(getattr(reward, "image_embeddings", None)):
        from ..embedded.diversity import mean_pairwise_cosine_distance

        out["diversity"] = lambda images: float(mean_pairwise_cosine_distance(_embeddings(reward, images)))
        if dv.samples_per_prompt >= 2:
            from ..metrics.diversity import EmbeddingDiversity

            out["prompt_diversity"] = EmbeddingDiversity(lambda images: _embeddings(reward, images))
    return out


def _embeddings(reward, images):
    """The reward's image embeddings of ``images``, on the reward's device, no grad."""
    import torch

    device = next(iter(reward.parameters()), torch.zeros(())).device
    with torch.no_grad():
        return reward.image_embeddings(images.to(device)).float()


def main(argv: Optional[List[str]] = None, default_config: str = "draftp_sd") -> int:
    """Exit codes: 0 done, 2 bad input (one line per problem, naming its key; nothing created),
    3 training diverged (``model.nan_tolerance``). Anything else is a bug and keeps its traceback;
    ``NAD_TRACEBACK=1`` shows the traceback behind a bad-input message too."""
    from ..config import load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv, default_config)
    try:
        dict_cfg = compose(args.config_path, args.config_name, args.overrides)
        cfg = _validated(load_config, dict_cfg)
        for key, reason in cfg.notices_given:
            log.info(f"notice: {key}: no effect here ({reason})")
        if os.environ.get("NAD_PREFLIGHT_ONLY") == "1":
            preflight(cfg)
            print("configuration and inputs OK")
            return 0
        log_dir = run(cfg, dict_cfg)
    except InputError as e:
        return report(e)
    except FloatingPointError as e:  # the NaN guard gave up (models/base.py)
        print(f"error: training stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    print(f"run directory: {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
