"""DRaFT, DRaFT+, DRaFT-K and DRaFT-LV (and AlignProp, which differs only in its step plan)."""
from __future__ import annotations

from typing import List

from ..core.draft import DraftConfig, draft_objective
from .base import AlignmentModel


class DraftPlusModel(AlignmentModel):
    """Reward-gradient fine-tuning. The objective is :func:`core.draft.draft_objective`."""

    def draft_config(self) -> DraftConfig:
        m = self.mcfg
        return DraftConfig(truncation_steps=m.truncation_steps, kl_coeff=m.kl_coeff, eta=m.infer.eta,
                           checkpoint=m.sampler_checkpointing, decode_target=m.decode_target,
                           lv_copies=m.lv_copies)

    def objective(self, prompts: List[str], round_idx: int):
        rule, cond, latents, g = self.sampling_setup(prompts, round_idx, "rollout")
        w = self.mcfg.infer.unconditional_guidance_scale
        parts_log = {}

        def score(images):
            total, parts = self.score(images, prompts)
            if len(parts) > 1:
                parts_log.update({f"reward/{k}": v.detach().mean() for k, v in parts.items()})
            return total

        loss, metrics, _ = draft_objective(
            self.backend.denoiser(cond, w), self.backend.reference_denoiser(cond, w), rule, latents,
            self.decode, score, self.draft_config(), generator=g)
        metrics.update(parts_log)
        return loss, metrics
