"""``weighted_sum``: r = Σ_i w_i · r_i over rewards built from config, each r_i logged on its own.

Config (``rm``)::

    name: weighted_sum
    components:
      - {name: pickscore, weight: 1.0, path: /models/PickScore_v1}
      - {name: aesthetic, weight: 0.1, path: /models/aesthetic.pth, kwargs: {clip_path: /models/clip-l14}}
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, List, Sequence, Tuple

import torch

from .base import Reward, _at_least_fp32, build_reward, register_reward

_COMPONENT_KEYS = {"name", "weight", "path", "kwargs", "label", "fp32"}


class WeightedSum(Reward):
    name = "weighted_sum"

    def __init__(self, rewards: List[Reward], weights: List[float], labels: List[str]):
        super().__init__()
        self.rewards = torch.nn.ModuleList(rewards)
        self.weights = [float(w) for w in weights]
        self.labels = labels
        self.differentiable = all(r.differentiable for r in rewards)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._score(images, prompts)[0]

    def score_with_parts(self, images, prompts) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total ``[B]`` and each component's unweighted score ``[B]`` keyed by its label (a nested
        weighted sum's parts appear as ``label/part``)."""
        with self.precision_scope():
            total, parts = self._score(self.cast_input(images), prompts)
        return _at_least_fp32(total), parts

    def _score(self, images, prompts):
        total, parts = None, {}
        for reward, w, label in zip(self.rewards, self.weights, self.labels):
            r, sub = reward.score_with_parts(images, prompts)
            parts[label] = r
            if len(sub) > 1 or next(iter(sub)) != reward.name:
                parts.update({f"{label}/{k}": v for k, v in sub.items()})
            total = w * r if total is None else total + w * r
        return total, parts


@register_reward("weighted_sum")
def weighted_sum(components=None, **kwargs) -> Reward:
    if kwargs:
        raise ValueError(f"reward 'weighted_sum': unknown arguments {sorted(kwargs)}; give components=[...]")
    if not components:
        raise ValueError("reward 'weighted_sum' needs components: a list of {name, weight, path?, kwargs?}")
    rewards, weights, labels = [], [], []
    for i, comp in enumerate(components):
        if not isinstance(comp, Mapping):
            raise ValueError(f"weighted_sum components[{i}] must be a mapping with name and weight, got {comp!r}")
        unknown = set(comp) - _COMPONENT_KEYS
        if unknown:
            raise ValueError(f"weighted_sum components[{i}]: unknown keys {sorted(unknown)}; allowed {sorted(_COMPONENT_KEYS)}")
        if "name" not in comp or "weight" not in comp:
            raise ValueError(f"weighted_sum components[{i}] needs 'name' and 'weight', got keys {sorted(comp)}")
        sub_kwargs = dict(comp.get("kwargs") or {})
        reward = build_reward(str(comp["name"]), path=comp.get("path"), fp32=bool(comp.get("fp32", False)), **sub_kwargs)
        label = str(comp.get("label") or comp["name"])
        if label in labels:
            label = f"{label}#{i}"
        rewards.append(reward)
        weights.append(float(comp["weight"]))
        labels.append(label)
    return WeightedSum(rewards, weights, labels)
