"""Cross-cutting reporting as Lightning callbacks: reward curve, validation grids, metrics JSON."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

import torch
from lightning.pytorch.callbacks import Callback

from ..files import atomic_save_figure, atomic_save_image, atomic_write_json
from .base import validation_means


def image_grid(rows: List[torch.Tensor], cols: int = 16) -> torch.Tensor:
    """rows: list of ``[N, 3, H, W]`` in [0,1] (same N) → one grid image ``[3, H', W']``.

    Images ``i`` of every row sit in the same column; beyond ``cols`` images the rows wrap, so the grid
    is a stack of bands of ``len(rows)`` rows × at most ``cols`` images (the last band padded with white).
    """
    n = rows[0].shape[0]
    cols = max(1, min(cols, n))
    bands = []
    for start in range(0, n, cols):
        for r in rows:
            chunk = list(r[start:start + cols])
            chunk += [torch.ones_like(r[0])] * (cols - len(chunk))
            bands.append(torch.cat(chunk, dim=2))
    return torch.cat(bands, dim=1)


def save_png(img: torch.Tensor, path: str) -> None:
    from PIL import Image

    arr = (img.clamp(0, 1).permute(1, 2, 0).mul(255).round().to(torch.uint8)).cpu().numpy()
    atomic_save_image(Image.fromarray(arr), path)


class TrainingReport(Callback):
    """Writes ``images/val_step*.png`` (per band of 16 prompts: base row above fine-tuned row, same
    latents), logs the grids to TensorBoard, and at the end ``reward_curve.png`` and ``metrics.json``
    in the run directory.

    ``diversity``: images ``[N, 3, H, W]`` → a float (e.g. the mean pairwise embedding distance);
    ``lpips``: (images, prompts) → ``{"mean": ...}``, per-prompt LPIPS; ``prompt_diversity``: the same
    contract, per-prompt embedding distance (validation renders each prompt several times). Each is
    logged for the base and the fine-tuned images of every validation."""

    def __init__(self, log_dir: str, diversity: Optional[Callable] = None, lpips: Optional[Callable] = None,
                 prompt_diversity: Optional[Callable] = None):
        self.log_dir = log_dir
        self.diversity = diversity
        self.lpips = lpips
        self.prompt_diversity = prompt_diversity
        self.train_history: List[Dict] = []
        self.val_history: List[Dict] = []

    def _history_file(self) -> Optional[str]:
        """The previous run's metrics.json: in the log dir, or where exp_manager moved it when the run
        resumed (NeMo moves the earlier run's files into ``run_<n>/``; the highest n is the latest)."""
        path = os.path.join(self.log_dir, "metrics.json")
        if os.path.isfile(path):
            return path
        runs = []
        for name in os.listdir(self.log_dir) if os.path.isdir(self.log_dir) else []:
            if name.startswith("run_") and name[4:].isdigit():
                runs.append((int(name[4:]), os.path.join(self.log_dir, name, "metrics.json")))
        for _, candidate in sorted(runs, reverse=True):
            if os.path.isfile(candidate):
                return candidate
        return None

    def _load_history(self):
        path = self._history_file()
        if path is not None and not self.train_history:  # resumed run: keep earlier points
            with open(path) as f:
                data = json.load(f)
            self.train_history = data.get("train", [])
            self.val_history = data.get("validation", [])

    def on_fit_start(self, trainer, pl_module):
        self._load_history()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        if "reward_mean" in m and (not self.train_history or self.train_history[-1]["step"] != trainer.global_step):
            step = trainer.global_step
            self.train_history = [h for h in self.train_history if h["step"] < step]  # see on_validation_epoch_end
            self.train_history.append({"step": step, **{k: float(v) for k, v in m.items() if not k.startswith("val_")}})

    def on_validation_epoch_end(self, trainer, pl_module):
        outs = pl_module.val_outputs
        if not outs or trainer.sanity_checking:
            return
        base = torch.cat([o["base"] for o in outs])
        tuned = torch.cat([o["tuned"] for o in outs])
        rb = torch.cat([o["reward_base"] for o in outs])
        rt = torch.cat([o["reward_tuned"] for o in outs])
        means = validation_means(outs)
        entry = {"step": trainer.global_step, "reward_base": means["val_reward_base"],
                 "reward_tuned": means["val_reward"], "rewards_base": rb.tolist(), "rewards_tuned": rt.tolist(),
                 "prompts": [p for o in outs for p in o["prompts"]]}
        # paired per-image statistics (same latents): gain = reward_tuned − reward_base, its standard error
        diff = rt.double() - rb.double()
        entry["gain_standard_error"] = float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else None
        entry["images_improved"] = int((diff > 0).sum())
        # per-batch extra reward tensors a model adds (e.g. SDPO: reward at 1/2/4/8 sampling steps)
        for key in outs[0].get("extra_rewards", {}):
            entry[key] = float(torch.cat([o["extra_rewards"][key] for o in outs]).mean())
        if self.diversity is not None:
            entry["diversity_base"] = float(self.diversity(base))
            entry["diversity_tuned"] = float(self.diversity(tuned))
        if self.lpips is not None:
            entry["lpips_diversity_base"] = float(self.lpips(base, entry["prompts"])["mean"])
            entry["lpips_diversity_tuned"] = float(self.lpips(tuned, entry["prompts"])["mean"])
        if self.prompt_diversity is not None:
            entry["prompt_diversity_base"] = float(self.prompt_diversity(base, entry["prompts"])["mean"])
            entry["prompt_diversity_tuned"] = float(self.prompt_diversity(tuned, entry["prompts"])["mean"])
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                exp = getattr(logger, "experiment", None)
                for key in ("diversity_base", "diversity_tuned", "lpips_diversity_base", "lpips_diversity_tuned",
                            "prompt_diversity_base", "prompt_diversity_tuned"):
                    if key in entry and hasattr(exp, "add_scalar"):
                        exp.add_scalar(f"validation/{key}", entry[key], trainer.global_step)
        # a run resumed from a checkpoint older than its last validation validates those steps again
        self.val_history = [v for v in self.val_history if v["step"] < entry["step"]] + [entry]
        if trainer.is_global_zero:
            grid = image_grid([base, tuned])
            os.makedirs(os.path.join(self.log_dir, "images"), exist_ok=True)
            save_png(grid, os.path.join(self.log_dir, "images", f"val_step{trainer.global_step:06d}.png"))
            for logger in trainer.loggers:
                exp = getattr(logger, "experiment", None)
                if hasattr(exp, "add_image"):
                    exp.add_image("validation/base_vs_tuned", grid, trainer.global_step)
            self._write_json()

    def _write_json(self):
        atomic_write_json(os.path.join(self.log_dir, "metrics.json"),
                          {"train": self.train_history, "validation": self.val_history})

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self._write_json()
        if self.train_history:
            plot_reward_curve(self.train_history, self.val_history, os.path.join(self.log_dir, "reward_curve.png"))


def plot_reward_curve(train: List[Dict], val: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in train], [h["reward_mean"] for h in train], label="train reward (batch mean)", alpha=0.6)
    if val:
        ax.plot([v["step"] for v in val], [v["reward_tuned"] for v in val], "o-", label="validation: fine-tuned")
        ax.plot([v["step"] for v in val], [v["reward_base"] for v in val], "s--", label="validation: base")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)
