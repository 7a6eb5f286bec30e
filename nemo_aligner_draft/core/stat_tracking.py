"""Per-prompt reward normalisation for policy-gradient methods (DDPO §5, SDPO §4).

DDPO (Black et al. 2023, arXiv 2305.13301) normalises each reward by the running mean and standard
deviation of the rewards seen for the same prompt:  A = (r − μ_prompt) / (σ_prompt + 1e-6), where
the statistics come from a per-prompt buffer of the last ``buffer_size`` rewards (the current batch
included). Until a prompt's buffer holds ``min_count`` rewards the batch statistics are used instead.

SDPO (Zhang et al. 2024, arXiv 2411.11727) keeps one such buffer per (prompt, sampler step) for its
dense per-step returns; pass rewards of shape ``[B, T]`` to get that behaviour. The batch fallback
is then the statistics of the same step's column.

Statistics are population statistics (divide by n), matching the reference implementations.
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Hashable, List, Sequence, Tuple

import torch

STD_EPS = 1e-6


def batch_advantages(rewards: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """(r − mean) / (std + eps) over the whole tensor (no per-prompt tracking). Same shape as ``rewards``."""
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + eps)).to(rewards.dtype)


class PerPromptStatTracker:
    """Running per-prompt (or per-prompt-and-step) reward statistics.

    ``update(prompts, rewards)``: ``prompts`` a sequence of B strings; ``rewards`` ``[B]`` (DDPO) or
    ``[B, T]`` (SDPO, one buffer per step). Returns advantages with the shape of ``rewards``.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = STD_EPS):
        # the ranges (1 <= min_count <= buffer_size) are the config section's rules (DDPOConfig, SDPOConfig)
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.eps = float(eps)
        self._buffers: Dict[Tuple[str, Hashable], Deque[float]] = {}

    def _buffer(self, key) -> Deque[float]:
        if key not in self._buffers:
            self._buffers[key] = deque(maxlen=self.buffer_size)
        return self._buffers[key]

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        prompts = list(prompts)
        if rewards.ndim not in (1, 2):
            raise ValueError(f"rewards must be [B] or [B, T], got shape {tuple(rewards.shape)}")
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {rewards.shape[0]} rewards")
        per_step = rewards.ndim == 2
        r = rewards.detach().double().cpu()
        r2 = r if per_step else r[:, None]
        adv = torch.empty_like(r2)
        groups: Dict[str, List[int]] = {}
        for row, p in enumerate(prompts):
            groups.setdefault(p, []).append(row)
        for step in range(r2.shape[1]):
            column = r2[:, step]
            for prompt, rows in groups.items():
                key = (prompt, step if per_step else None)
                buf = self._buffer(key)
                buf.extend(column[rows].tolist())
                if len(buf) < self.min_count:
                    stats = column
                else:
                    stats = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = stats.mean(), stats.std(unbiased=False)
                adv[rows, step] = (column[rows] - mean) / (std + self.eps)
        adv = adv if per_step else adv[:, 0]
        return adv.to(dtype=rewards.dtype, device=rewards.device)

    def get_stats(self) -> Dict[str, Dict[str, float]]:
        """Per key (``prompt`` or ``prompt@step``): mean, std, count of the buffer (for logging)."""
        out = {}
        for (prompt, step), buf in self._buffers.items():
            t = torch.tensor(list(buf), dtype=torch.float64)
            name = prompt if step is None else f"{prompt}@{step}"
            out[name] = {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "count": len(buf)}
        return out

    def clear(self) -> None:
        self._buffers.clear()

    # Checkpointing: plain lists, so the state survives torch.save(weights_only=True) round-trips.
    def state_dict(self) -> Dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "keys": [[p, -1 if s is None else int(s)] for p, s in self._buffers],
            "values": [list(b) for b in self._buffers.values()],
        }

    def load_state_dict(self, state: Dict) -> None:
        for k in ("keys", "values"):
            if k not in state:
                raise KeyError(f"stat tracker state is missing {k!r} (expected keys, values)")
        self._buffers = {}
        for (prompt, step), values in zip(state["keys"], state["values"]):
            buf = self._buffer((prompt, None if step == -1 else int(step)))
            buf.extend(float(v) for v in values)
