"""Which training algorithms exist: one :class:`Algorithm` entry each.

An entry names the algorithm's ``model.algorithm`` value, its training recipe (the loop that turns a
batch of prompts into optimizer steps, :mod:`.reward_backprop` or :mod:`.policy_gradient`), the key of
its loop section under ``trainer`` (NeMo-Aligner calls DRaFT+'s ``trainer.draftp_sd``), its own typed
section under ``model`` if it has one, and what it needs of the reward and the sampler. The config
validates against these entries and the shell builds the recipe from them; nothing else in the package
lists algorithms. Adding one is a recipe file plus one ``register_algorithm`` call.

Classes are named ``"module:Class"`` and imported on first use, so the registry imports no recipe.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class Algorithm:
    name: str
    recipe: str  # "package.module:Class" of the training recipe
    loop_section: str  # trainer.<loop_section>: max_steps, val_check_interval, ... of this algorithm
    section: Optional[str] = None  # "package.module:Class" of model.<name>'s typed section, if it has one
    differentiable_reward: bool = True  # the loss backpropagates through the reward
    stochastic_sampler: bool = False  # needs model.infer.eta > 0 (per-step log-probabilities)
    epoch_sampling: bool = False  # a training step is a PPO epoch of num_sample_batches micro-batches

    def recipe_class(self) -> type:
        return _resolve(self.recipe)

    def section_class(self) -> Optional[type]:
        return _resolve(self.section) if self.section else None


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


ALGORITHMS: Dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    return ALGORITHMS[name]


_RB = "nemo_aligner_draft.algorithms.reward_backprop"
_PG = "nemo_aligner_draft.algorithms.policy_gradient"
register_algorithm(Algorithm("draftp", f"{_RB}:DraftRecipe", loop_section="draftp_sd"))
register_algorithm(Algorithm("alignprop", f"{_RB}:AlignPropRecipe", loop_section="alignprop",
                             section="nemo_aligner_draft.core.alignprop:AlignPropConfig"))
register_algorithm(Algorithm("ddpo", f"{_PG}:DDPORecipe", loop_section="ddpo",
                             section="nemo_aligner_draft.core.ddpo:DDPOConfig", differentiable_reward=False,
                             stochastic_sampler=True, epoch_sampling=True))
register_algorithm(Algorithm("sdpo", f"{_PG}:SDPORecipe", loop_section="sdpo",
                             section="nemo_aligner_draft.core.sdpo:SDPOConfig", differentiable_reward=False,
                             stochastic_sampler=True, epoch_sampling=True))
register_algorithm(Algorithm("grpo", "nemo_aligner_draft.algorithms.grpo:GRPORecipe", loop_section="grpo",
                             section="nemo_aligner_draft.core.grpo:GRPOConfig", differentiable_reward=False,
                             stochastic_sampler=True, epoch_sampling=True))
