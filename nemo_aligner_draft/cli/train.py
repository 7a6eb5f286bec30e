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
import contextlib
import logging
import os
import sys
from typing import List, Optional

REPO_CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # model.nan_tolerance consecutive non-finite steps

log = logging.getLogger("nemo_aligner_draft")


def compose(config_path: str, config_name: str, overrides: List[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = os.path.abspath(config_path)
    if not os.path.isdir(config_dir):
        raise FileNotFoundError(f"--config-path: {config_path!r} is not a directory")
    if not os.path.isfile(os.path.join(config_dir, config_name + ".yaml")) and not os.path.isfile(os.path.join(config_dir, config_name)):
        raise FileNotFoundError(f"--config-name: no {config_name}.yaml in {config_dir}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return hydra_compose(config_name=config_name.removesuffix(".yaml"), overrides=list(overrides))


def parse_args(argv: Optional[List[str]] = None, default_config: str = "draftp_sd"):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--config-path", "-cp", default=REPO_CONF)
    p.add_argument("--config-name", "-cn", default=default_config)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    return p.parse_args(argv)


def preflight(cfg) -> dict:
    """Check paths and inputs; return the loaded prompts and reward. Raises with key-named messages."""
    from ..backends.base import detect_family
    from ..data.prompts import load_prompts
    from ..rewards.base import Reward

    m = cfg.model
    with input_errors("model.pretrained", m.pretrained, "a diffusers pipeline"):
        detect_family(m.pretrained)  # raises FileNotFoundError naming model.pretrained
    lpips_path = m.diversity.lpips_backbone_path
    if lpips_path is not None and not os.path.isfile(lpips_path):
        raise FileNotFoundError(f"model.diversity.lpips_backbone_path: {lpips_path!r} does not exist "
                                f"(expected a local torchvision AlexNet/VGG16 state dict file)")
    train = load_prompts(m.data.train.dataset_path, "model.data.train.dataset_path", m.data.max_prompt_chars)
    world = _world(cfg.trainer)
    if len(train) < m.micro_batch_size * world:
        raise ValueError(f"model.data.train.dataset_path: {len(train)} prompt(s), fewer than one round of "
                         f"model.micro_batch_size × data-parallel size = {m.micro_batch_size} × {world}")
    val = None
    if m.data.validation.dataset_path:
        val = load_prompts(m.data.validation.dataset_path, "model.data.validation.dataset_path", m.data.max_prompt_chars)
    with input_errors("rm.model.restore_from_path" if cfg.rm.model.restore_from_path else "rm.name",
                      cfg.rm.model.restore_from_path or cfg.rm.name, "the reward"):
        reward = build_reward_from_config(cfg.rm)
    if not reward.differentiable and m.algorithm in ("draftp", "alignprop"):
        raise ValueError(f"rm.name: reward {reward.name!r} is not differentiable; model.algorithm={m.algorithm} "
                         f"backpropagates through the reward (use ddpo or sdpo, or a differentiable reward)")
    assert isinstance(reward, Reward)
    probe_reward(reward, cfg)
    return {"train": train, "val": val, "reward": reward}


def probe_reward(reward, cfg) -> None:
    """Score two mid-grey images once, so a reward returning the wrong shape or dtype fails here,
    before any run directory exists, rather than at the first training step. Non-finite values are
    left to the NaN guard: a reward may be NaN only on some images."""
    import torch

    from ..rewards.base import check_reward_output

    inf = cfg.model.infer
    images = torch.full((2, 3, inf.height, inf.width), 0.5)
    with torch.no_grad():
        out = reward(images, ["a photo", "a photo"])
    check_reward_output(out, 2, reward.name)


def build_reward_from_config(rm):
    from ..rewards import build_reward

    path = rm.model.restore_from_path
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"rm.model.restore_from_path: {path!r} does not exist")
    kwargs = dict(rm.kwargs)
    if rm.components and rm.name != "weighted_sum":
        raise ValueError(f"rm.components: {len(rm.components)} rewards listed, but rm.name is {rm.name!r}; "
                         f"components are only used with rm.name=weighted_sum")
    if rm.name == "weighted_sum":
        kwargs["components"] = [
            {"name": c.name, "weight": c.weight, "path": c.model.restore_from_path, "kwargs": dict(c.kwargs)}
            for c in rm.components
        ]
        for i, c in enumerate(rm.components):
            if c.model.restore_from_path is not None and not os.path.exists(c.model.restore_from_path):
                raise FileNotFoundError(f"rm.components[{i}].model.restore_from_path: "
                                        f"{c.model.restore_from_path!r} does not exist")
    # rm.fp32 keeps the reward's weights and inputs in fp32 and outside autocast
    return build_reward(rm.name, path=path, fp32=rm.fp32, **kwargs)


def model_class(algorithm: str):
    if algorithm in ("draftp", "alignprop"):
        from ..models.draftp import DraftPlusModel

        return DraftPlusModel
    if algorithm in ("ddpo", "sdpo"):
        from ..models.policy_gradient import PolicyGradientModel

        return PolicyGradientModel
    raise ValueError(f"model.algorithm: unknown {algorithm!r}")


# Set to a directory to have every rank write its trainable parameters, prompts and first latents
# there at the end of training (the multi-process tests compare ranks and layouts with it).
RANK_DUMP_ENV = "NAD_RANK_DUMP_DIR"


def build_trainer(cfg, max_steps: int, accumulation: int):
    from lightning.pytorch import Trainer

    from ..models.checkpoint_io import AtomicCheckpointIO

    t, loop = cfg.trainer, cfg.loop
    accelerator = "gpu" if t.accelerator == "cuda" else t.accelerator
    strategy = build_strategy(t, accelerator)
    val_every = loop.val_check_interval * accumulation if loop.val_check_interval > 0 else None
    precision = t.precision if str(t.precision) != "32" else "32-true"
    callbacks = []
    if os.environ.get(RANK_DUMP_ENV):
        from ..models.distributed import RankDump

        callbacks.append(RankDump(os.environ[RANK_DUMP_ENV]))
    return Trainer(callbacks=callbacks,
        accelerator=accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy, precision=precision,
        max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        use_distributed_sampler=False, val_check_interval=val_every, check_val_every_n_epoch=None,
        limit_val_batches=loop.limit_val_batches if val_every else 0, num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps, plugins=[AtomicCheckpointIO()], enable_model_summary=False,
    )


def build_strategy(t, accelerator: str):
    """Lightning strategy for ``trainer.strategy``: DDP (gloo on CPU, NCCL on GPU) whenever the world
    has more than one process, FSDP on request. The gradient all-reduce is Lightning's, never ours."""
    import torch
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_gpu else "gloo"
    if t.strategy == "fsdp":
        if not on_gpu:
            raise ValueError("trainer.strategy: fsdp needs GPUs (Lightning's FSDP strategy refuses the CPU "
                             "accelerator); use trainer.strategy=ddp or auto on CPU")
        # use_orig_params: frozen (VAE, text encoders, reference) and trainable weights share flat
        # parameters; activation checkpointing is the model's own (model.activation_checkpointing)
        return FSDPStrategy(process_group_backend=backend, use_orig_params=True)
    if t.strategy == "ddp" or (t.strategy == "auto" and _world(t) > 1):
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=False)
    return t.strategy


def _world(t) -> int:
    d = t.devices
    return (d if isinstance(d, int) and d > 0 else 1) * t.num_nodes


def exp_manager_config(cfg, monitor: str) -> dict:
    e, loop, run_name = cfg.exp_manager, cfg.loop, cfg.name
    ckpt = e.checkpoint_callback_params
    return {
        "explicit_log_dir": e.explicit_log_dir,
        "exp_dir": e.exp_dir,
        "name": e.name or run_name,
        "use_datetime_version": False,
        "create_wandb_logger": e.create_wandb_logger,
        "wandb_logger_kwargs": {"name": e.name or run_name, "project": run_name} if e.create_wandb_logger else None,
        "create_tensorboard_logger": e.create_tensorboard_logger,
        "resume_if_exists": e.resume_if_exists,
        "resume_ignore_no_checkpoint": True,
        "log_step_timing": False,
        "log_tflops_per_sec_per_gpu": False,
        "create_preemption_callback": False,
        "seconds_to_sleep": 0,
        "checkpoint_callback_params": {
            "monitor": monitor,
            "mode": "min" if monitor == "train_loss" else "max",
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
        "ema": {"enable": e.ema.enable, "decay": e.ema.decay},
    }


def run(cfg, dict_cfg) -> str:
    """Train from a validated config; returns the run directory."""
    import torch
    from omegaconf import OmegaConf

    from ..models.base import effective_max_steps
    from ..models.callbacks import TrainingReport

    inputs = preflight(cfg)
    torch.manual_seed(cfg.model.seed)
    world = _world(cfg.trainer)
    accumulation = max(cfg.model.global_batch_size // (cfg.model.micro_batch_size * world), 1)
    max_steps = effective_max_steps(cfg.loop, cfg.trainer.max_steps, len(inputs["train"]), cfg.model.global_batch_size)
    cls = model_class(cfg.model.algorithm)
    with input_errors("model.pretrained", cfg.model.pretrained, "a diffusers pipeline"):
            model = cls(cfg=OmegaConf.create(OmegaConf.to_container(dict_cfg.model, resolve=True)), trainer=None,
                    loop=cfg.loop, reward=inputs["reward"], train_prompts=inputs["train"], val_prompts=inputs["val"],
                    precision=cfg.trainer.precision)
    attach_diversity(model)
    trainer = build_trainer(cfg, max_steps, accumulation)
    from nemo.utils.exp_manager import exp_manager

    if cfg.exp_manager.resume_if_exists:
        from ..models.checkpoint_io import tidy_checkpoint_dir

        for moved in tidy_checkpoint_dir(os.path.join(planned_log_dir(cfg), "checkpoints")):
            log.warning(f"resume: set aside {moved} (left over from an interrupted run)")
    log_dir = str(exp_manager(trainer, exp_manager_config(cfg, "train_loss")))
    trainer.callbacks.append(TrainingReport(log_dir))
    with open(os.path.join(log_dir, "config.yaml.tmp"), "w") as f:
        f.write(OmegaConf.to_yaml(dict_cfg))
    os.replace(os.path.join(log_dir, "config.yaml.tmp"), os.path.join(log_dir, "config.yaml"))
    model.set_trainer(trainer)
    trainer.fit(model, ckpt_path=getattr(trainer, "ckpt_path", None))
    if trainer.is_global_zero and cfg.model.peft.peft_scheme != "none":
        from ..export.lora import export_lora

        export_lora(model.unet, os.path.join(log_dir, "export"), family=model.backend.family)
    return log_dir


def planned_log_dir(cfg) -> str:
    """The run directory exp_manager will use (explicit_log_dir, else <exp_dir or ./nemo_experiments>/<name>)."""
    e = cfg.exp_manager
    if e.explicit_log_dir:
        return e.explicit_log_dir
    return os.path.join(e.exp_dir or os.path.join(os.getcwd(), "nemo_experiments"), e.name or cfg.name)


def attach_diversity(model) -> None:
    """Validation diversity, base vs fine-tuned: per-prompt LPIPS when ``model.diversity.lpips_backbone_path``
    is set; and, when the reward exposes ``image_embeddings`` (CLIP-type rewards), the mean pairwise
    cosine distance of the validation images' embeddings."""
    dv = model.mcfg.diversity
    path, net = dv.lpips_backbone_path, dv.lpips_net
    if path is not None:
        from ..metrics.diversity import LpipsDiversity

        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.diversity.lpips_backbone_path: {path!r} does not exist")
        model.lpips_fn = LpipsDiversity(net=net, backbone_path=path)
    embed = getattr(model.reward, "image_embeddings", None)
    if not callable(embed):
        return
    import torch

    from ..embedded.diversity import mean_pairwise_cosine_distance

    def diversity(images):
        with torch.no_grad():
            return float(mean_pairwise_cosine_distance(embed(images.to(model.device)).float()))

    model.diversity_fn = diversity


def main(argv: Optional[List[str]] = None, default_config: str = "draftp_sd") -> int:
    from ..config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv, default_config)
    try:
        dict_cfg = compose(args.config_path, args.config_name, args.overrides)
        cfg = load_config(dict_cfg)
        preflight_only = os.environ.get("NAD_PREFLIGHT_ONLY") == "1"
        if preflight_only:
            preflight(cfg)
            print("configuration and inputs OK")
            return 0
        log_dir = run(cfg, dict_cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FloatingPointError as e:  # the NaN guard gave up (models/base.py)
        print(f"error: training stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (FileNotFoundError, ValueError, TypeError, PermissionError) as e:
        if _is_user_input_error(e):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    except Exception as e:  # Hydra's own override errors
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    print(f"run directory: {log_dir}")
    return 0


@contextlib.contextmanager
def input_errors(key: str, path, what: str):
    """Loading ``what`` from a user path: an error that does not already name a key (a corrupt JSON
    file, a truncated safetensors file) is re-raised as one line naming ``key`` and the path."""
    try:
        yield
    except Exception as e:
        if _is_user_input_error(e) or isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        detail = (str(e).strip().splitlines() or [""])[-1][:300]
        raise ValueError(f"{key}: cannot load {what} from {path!r}: {type(e).__name__}: {detail}") from e


def _is_user_input_error(e: Exception) -> bool:
    """Errors we raise for bad input name a config key or path; anything else is a bug: re-raise."""
    text = str(e)
    return any(text.startswith(p) for p in ("model.", "rm.", "trainer.", "exp_manager.", "--config", "checkpoint")) \
        or isinstance(e, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
