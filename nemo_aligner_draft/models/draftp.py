"""DRaFT, DRaFT+, DRaFT-K and DRaFT-LV, and AlignProp (``model.algorithm=alignprop``), which differs
only in its step plan (randomised truncation) and its reward-to-loss options."""
from __future__ import annotations

from typing import List

from ..core.alignprop import AlignPropConfig, alignprop_objective
from ..core.draft import DraftConfig, draft_objective
from ..errors import InputError
from .base import AlignmentModel


class DraftPlusModel(AlignmentModel):
    """Reward-gradient fine-tuning. The objective is :func:`core.draft.draft_objective`, or
    :func:`core.alignprop.alignprop_objective` when ``model.algorithm`` is ``alignprop``."""

    def draft_config(self) -> DraftConfig:
        m = self.mcfg
        return DraftConfig(truncation_steps=m.truncation_steps, kl_coeff=m.kl_coeff, eta=m.infer.eta,
                           checkpoint=m.sampler_checkpointing, decode_target=m.decode_target,
                           lv_copies=m.lv_copies)

    def alignprop_config(self) -> AlignPropConfig:
        """``model.alignprop`` → the core config. ``truncation: per_step`` is the original scheme (a
        new cut each step, detaching only that step's UNet output); ``per_rollout`` draws one cut
        per rollout from ``cut_distribution``. The DRaFT+ penalty applies when ``model.kl_coeff > 0``."""
        m = self.mcfg
        a = m.alignprop
        if a is None:
            raise InputError("model.alignprop", "missing (model.algorithm=alignprop needs it)")
        mode = "per_step" if a.truncation == "per_step" else a.cut_distribution
        return AlignPropConfig(truncation=mode, gaussian_mean=a.cut_mean, gaussian_std=a.cut_std,
                               uniform_min=a.cut_min, uniform_max=a.cut_max, fixed_cut=a.fixed_cut,
                               reference_steps=a.reference_steps, loss_mode=a.loss_mode,
                               loss_target=a.loss_target, loss_coeff=a.loss_coeff, kl_coeff=m.kl_coeff,
                               eta=m.infer.eta, decode_target=m.decode_target)

    def objective(self, prompts: List[str], round_idx: int):
        rule, cond, latents, g = self.sampling_setup(prompts, round_idx, "rollout")
        w = self.mcfg.infer.unconditional_guidance_scale
        parts_log = {}

        def score(images):
            total, parts = self.score(images, prompts)
            if len(parts) > 1:
                parts_log.update({f"reward/{k}": v.detach().mean() for k, v in parts.items()})
            return total

        if self.mcfg.algorithm == "alignprop":
            loss, metrics, _ = alignprop_objective(
                self.backend.denoiser(cond, w), self.backend.reference_denoiser(cond, w), rule, latents,
                self.decode, score, self.alignprop_config(), generator=g,
                cut_generator=self.generator(round_idx, "alignprop_cut"))
            if not loss.requires_grad:
                # every UNet output was detached (per_step truncation): nothing to learn from this rollout
                loss = loss + 0.0 * sum(p.sum() for p in self.backend.trainable_parameters())
        else:
            loss, metrics, _ = draft_objective(
                self.backend.denoiser(cond, w), self.backend.reference_denoiser(cond, w), rule, latents,
                self.decode, score, self.draft_config(), generator=g)
        metrics.update(parts_log)
        return loss, metrics
