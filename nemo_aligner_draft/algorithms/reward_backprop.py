"""The reward-backprop recipe: DRaFT, DRaFT+, DRaFT-K, DRaFT-LV and AlignProp.

One Lightning ``training_step`` is one micro-batch of prompts on every rank (a *round*)::

    rule, conditioning, latents  ← model.sampling_setup(prompts, round)      seeded by global sample index
    loss, metrics                ← objective(...)                            sample with grad → decode → reward
    backward(loss / accumulation)                                            (OptimizerStep: NaN guard)
    every `accumulation` rounds: clip, optimizer step, LR step, log          (OptimizerStep.finish)

``accumulation = global_batch_size / (micro_batch_size × data-parallel size)``; Lightning's DDP/FSDP
strategy all-reduces the gradients. An algorithm of this family is a subclass that implements
:meth:`RewardBackpropRecipe.objective`; the sampler, decoding and the reward are the model's.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..core.alignprop import alignprop_objective
from ..core.draft import DraftConfig, draft_objective
from .optimizer_step import OptimizerStep


class RewardBackpropRecipe:
    """The loop; subclasses give the objective. ``model`` is the :class:`~..models.base.AlignmentModel`."""

    def __init__(self, model):
        self.model = model
        self.step = OptimizerStep(model, model.loop.gradient_clip_val, model.mcfg.nan_tolerance)

    # ------------------------------------------------------------------ what an algorithm implements
    def objective(self, prompts: List[str], round_idx: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop
    @property
    def prompts_per_step(self) -> int:
        """Prompts one rank draws per ``training_step``."""
        return self.model.mcfg.micro_batch_size

    def planned_batches(self, max_steps: int) -> int:
        return max_steps * self.model.accumulation

    def training_step(self, batch, batch_idx):
        model = self.model
        self.step.start()
        round_idx = model.consumed_samples // model.round_size
        loss, metrics = self.objective(list(batch["prompt"]), round_idx)
        model.consumed_samples += model.round_size
        self.step.backward(loss, metrics, 1.0 / model.accumulation)
        if (round_idx + 1) % model.accumulation == 0:
            self.step.finish()
        return loss.detach()

    # ------------------------------------------------------------------ hooks of the shell
    def validation_extras(self, prompts: List[str], batch_idx: int) -> Dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass

    # ------------------------------------------------------------------ shared pieces
    def scorer(self, prompts: List[str], parts_log: Dict):
        """images → rewards ``[B]`` for ``prompts``; a weighted sum's parts go into ``parts_log``."""
        def score(images):
            total, parts = self.model.score(images, prompts)
            if len(parts) > 1:
                parts_log.update({f"reward/{k}": v.detach().mean() for k, v in parts.items()})
            return total

        return score


class DraftRecipe(RewardBackpropRecipe):
    """DRaFT (``kl_coeff`` 0), DRaFT+ (the ε penalty), DRaFT-K (``truncation_steps``), DRaFT-LV
    (``lv_copies``): :func:`..core.draft.draft_objective`."""

    def __init__(self, model):
        super().__init__(model)
        m = model.mcfg
        self.params = DraftConfig(truncation_steps=m.truncation_steps, kl_coeff=m.kl_coeff, eta=m.infer.eta,
                                  checkpoint=m.sampler_checkpointing, decode_target=m.decode_target,
                                  lv_copies=m.lv_copies)

    def objective(self, prompts, round_idx):
        model = self.model
        rule, cond, latents, g = model.sampling_setup(prompts, round_idx, "rollout")
        w = model.mcfg.infer.unconditional_guidance_scale
        parts: Dict = {}
        loss, metrics, _ = draft_objective(model.backend.denoiser(cond, w), model.backend.reference_denoiser(cond, w),
                                           rule, latents, model.decode, self.scorer(prompts, parts), self.params,
                                           generator=g)
        metrics.update(parts)
        return loss, metrics


class AlignPropRecipe(RewardBackpropRecipe):
    """AlignProp: randomised truncation (``model.alignprop``), every step checkpointed, the DRaFT+ penalty
    when ``model.kl_coeff`` > 0: :func:`..core.alignprop.alignprop_objective`."""

    def objective(self, prompts, round_idx):
        model = self.model
        m = model.mcfg
        rule, cond, latents, g = model.sampling_setup(prompts, round_idx, "rollout")
        w = m.infer.unconditional_guidance_scale
        parts: Dict = {}
        loss, metrics, _ = alignprop_objective(
            model.backend.denoiser(cond, w), model.backend.reference_denoiser(cond, w), rule, latents, model.decode,
            self.scorer(prompts, parts), m.alignprop, kl_coeff=m.kl_coeff, eta=m.infer.eta,
            decode_target=m.decode_target, generator=g, cut_generator=model.generator(round_idx, "alignprop_cut"))
        metrics.update(parts)
        return loss, metrics
