"""DDPO and SDPO: policy-gradient fine-tuning on the shared shell (``model.algorithm`` ddpo | sdpo).

One Lightning ``training_step`` is one PPO *epoch* (DDPO's outer loop):

1. **Sample** ``num_sample_batches`` micro-batches of ``model.micro_batch_size`` prompts each with the
   stochastic DDIM sampler (``model.infer.eta > 0``), without gradient, storing the per-step
   log-probabilities (:func:`core.ddpo.ddpo_rollout`; SDPO: a *pair* of rollouts per prompt from the
   same x_T, :func:`core.sdpo.sdpo_paired_rollout`).
2. **Score**: DDPO scores the final images (the reward need not be differentiable, e.g. JPEG size);
   SDPO scores every step's one-step x̂0 prediction (dense rewards) and discounts them.
3. **Advantages** from per-prompt statistics (:class:`core.stat_tracking.PerPromptStatTracker`;
   SDPO: per prompt and step) or batch statistics when ``per_prompt_stat_tracking`` is false.
4. **Train** ``num_inner_epochs`` passes over the stored samples, shuffled into train micro-batches of
   ``train_micro_batch_size``; each train micro-batch visits a random ``timestep_fraction`` of its
   steps, one backward per step position (PPO-clip loss, :func:`core.ddpo.ddpo_step_loss`; SDPO:
   :func:`core.sdpo.sdpo_step_loss`).

Optimizer steps follow DDPO's accumulation: gradients are accumulated over the train micro-batches
that make up one sample batch's worth of samples (``micro_batch_size`` samples × the visited steps)
and then one optimizer step is taken. A training_step therefore takes ``num_inner_epochs ×
num_sample_batches`` optimizer steps, and Lightning's ``max_steps`` (which counts optimizer steps in
manual optimisation) counts those. The data loader hands each rank ``micro_batch_size ×
num_sample_batches`` prompts per training_step.

All randomness (initial latents, eta-noise, shuffling, step orders) comes from
``self.generator(round, purpose)``, so a run is a function of ``model.seed`` and its position in the
prompt stream. The stat tracker's buffers are saved in the checkpoint.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from ..core.ddpo import DDPOConfig as CoreDDPOConfig
from ..core.ddpo import Rollout, ddpo_rollout, ddpo_step_loss, iter_train_minibatches
from ..core.sampler import StepPlan, sample
from ..core.sdpo import SDPOConfig as CoreSDPOConfig
from ..core.sdpo import dense_rewards, discounted_returns, sdpo_advantages, sdpo_paired_rollout, sdpo_step_loss
from ..core.stat_tracking import PerPromptStatTracker, batch_advantages
from ..data.prompts import PromptDataset, collate_prompts
from ..data.sampler import PromptSampler
from ..errors import InputError
from .base import AlignmentModel, seeded_generator, window_mean


def cat_rollouts(parts: List[Rollout]) -> Rollout:
    """Concatenate rollouts along the sample axis (timesteps are shared)."""
    px = None if parts[0].pred_x0_steps is None else torch.cat([p.pred_x0_steps for p in parts])
    return Rollout(torch.cat([p.latents for p in parts]), torch.cat([p.next_latents for p in parts]),
                   torch.cat([p.log_probs for p in parts]), parts[0].timesteps,
                   torch.cat([p.final for p in parts]), px)


class PolicyGradientModel(AlignmentModel):
    """DDPO (PPO-clip on the denoising MDP) and SDPO (stepwise dense reward differences)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        m = self.mcfg
        if m.algorithm not in ("ddpo", "sdpo"):
            raise InputError("model.algorithm", f"PolicyGradientModel runs ddpo or sdpo, got {m.algorithm!r}")
        self.algo = m.algorithm
        self.pg = m.ddpo if self.algo == "ddpo" else m.sdpo
        if self.pg is None:
            raise InputError(f"model.{self.algo}", f"missing (model.algorithm={self.algo} needs it)")
        eta = m.infer.eta
        if self.algo == "ddpo":
            self.core_cfg = CoreDDPOConfig(eta=eta, clip_range=self.pg.clip_range, adv_clip_max=self.pg.adv_clip_max,
                                           timestep_fraction=self.pg.timestep_fraction)
        else:
            self.core_cfg = CoreSDPOConfig(eta=eta, gamma=self.pg.gamma, lam=self.pg.lam, log_scale=self.pg.log_scale,
                                           clip_range=self.pg.clip_range, adv_clip_max=self.pg.adv_clip_max,
                                           timestep_fraction=self.pg.timestep_fraction)
        self.tracker: Optional[PerPromptStatTracker] = None
        if self.pg.per_prompt_stat_tracking:
            self.tracker = PerPromptStatTracker(self.pg.stat_buffer_size, self.pg.stat_min_count)
        self.samples_seen = 0  # images generated for training, all ranks (SDPO: both trajectories)
        self.ppo_epochs = 0

    # ------------------------------------------------------------------ data
    @property
    def prompts_per_epoch(self) -> int:
        """Prompts one rank draws per training_step (one PPO epoch)."""
        return self.mcfg.micro_batch_size * self.pg.num_sample_batches

    def train_dataloader(self):
        ds = PromptDataset(self.train_prompts)
        need = self.prompts_per_epoch * self.dp_size
        if len(ds) < need:
            raise InputError(f"model.{self.algo}.num_sample_batches",
                             f"one PPO epoch draws micro_batch_size × num_sample_batches × data-parallel size = "
                             f"{need} prompts, but model.data.train.dataset_path has only {len(ds)}")
        trainer = getattr(self, "_trainer", None)
        max_steps = trainer.max_steps if trainer is not None else -1
        sampler = PromptSampler(len(ds), self.prompts_per_epoch, self.dp_rank, self.dp_size, self.mcfg.seed,
                                consumed_samples=lambda: self.consumed_samples,
                                length=max_steps if max_steps and max_steps > 0 else 2**62)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_prompts, num_workers=0)

    # ------------------------------------------------------------------ one PPO epoch
    def training_step(self, batch, batch_idx):
        prompts: List[str] = list(batch["prompt"])
        self._epoch_start = time.perf_counter()
        epoch_round = self.consumed_samples // (self.prompts_per_epoch * self.dp_size)
        mbs = self.mcfg.micro_batch_size
        chunks = [prompts[i:i + mbs] for i in range(0, len(prompts), mbs)]
        if self.algo == "ddpo":
            stats = self._ddpo_epoch(chunks, epoch_round)
        else:
            stats = self._sdpo_epoch(chunks, epoch_round)
        self.consumed_samples += self.prompts_per_epoch * self.dp_size
        self.ppo_epochs += 1
        return stats

    def _rollout_round(self, epoch_round: int, j: int) -> int:
        """A distinct round index per (epoch, sample batch) for the seeded generators."""
        return epoch_round * self.pg.num_sample_batches + j

    def _ddpo_epoch(self, chunks: List[List[str]], epoch_round: int):
        eta = self.mcfg.infer.eta
        w = self.mcfg.infer.unconditional_guidance_scale
        rollouts, rewards = [], []
        for j, chunk in enumerate(chunks):
            rule, cond, latents, g = self.sampling_setup(chunk, self._rollout_round(epoch_round, j), "rollout")
            ro = ddpo_rollout(self.backend.denoiser(cond, w), rule, latents, eta, generator=g)
            with torch.no_grad():
                r, _ = self.score(self.decode(ro.final), chunk)
            rollouts.append(ro)
            rewards.append(r.detach())
        rollout = cat_rollouts(rollouts)
        rewards_t = torch.cat(rewards)
        prompts = [p for c in chunks for p in c]
        adv = self._advantages(prompts, rewards_t).to(rollout.log_probs.device)
        self.samples_seen += len(prompts) * self.dp_size
        reward_stats = self._reward_stats(rewards_t)

        def step_loss(idx: torch.Tensor, steps: torch.Tensor, rule, den):
            return ddpo_step_loss(den, rule, rollout.select(idx.to(rollout.final.device)), adv[idx], steps,
                                  self.core_cfg)

        return self._train_passes(prompts, rule, epoch_round, step_loss, reward_stats)

    def _sdpo_epoch(self, chunks: List[List[str]], epoch_round: int):
        eta = self.mcfg.infer.eta
        w = self.mcfg.infer.unconditional_guidance_scale
        firsts, seconds, returns1, returns2, finals = [], [], [], [], []
        for j, chunk in enumerate(chunks):
            rule, cond, latents, g = self.sampling_setup(chunk, self._rollout_round(epoch_round, j), "rollout")
            first, second = sdpo_paired_rollout(self.backend.denoiser(cond, w), rule, latents, eta, generator=g)
            for ro, out in ((first, returns1), (second, returns2)):
                step_prompts = [p for p in chunk for _ in range(rule.num_steps)]  # row b·T + t is prompt b
                dense = dense_rewards(ro.pred_x0_steps, self.decode,
                                      lambda imgs, ps=step_prompts: self.score(imgs, ps)[0])
                out.append(discounted_returns(dense, self.core_cfg.gamma))
            finals.append(torch.cat([returns1[-1][:, -1], returns2[-1][:, -1]]))
            firsts.append(first)
            seconds.append(second)
        first, second = cat_rollouts(firsts), cat_rollouts(seconds)
        g1, g2 = torch.cat(returns1), torch.cat(returns2)
        prompts = [p for c in chunks for p in c]
        adv1, adv2 = sdpo_advantages(g1, g2, prompts, self.tracker)
        dev = first.log_probs.device
        adv1, adv2 = adv1.to(dev), adv2.to(dev)
        self.samples_seen += 2 * len(prompts) * self.dp_size
        # the last step's x̂0 is the final image: its (undiscounted) reward is the sample's reward
        reward_stats = self._reward_stats(torch.cat(finals))

        def step_loss(idx: torch.Tensor, steps: torch.Tensor, rule, den):
            i = idx.to(dev)
            return sdpo_step_loss(den, rule, first.select(i), second.select(i), adv1[idx], adv2[idx], steps,
                                  self.core_cfg)

        return self._train_passes(prompts, rule, epoch_round, step_loss, reward_stats)

    def _advantages(self, prompts: List[str], rewards: torch.Tensor) -> torch.Tensor:
        if self.tracker is not None:
            return self.tracker.update(prompts, rewards)
        return batch_advantages(rewards)

    def _reward_stats(self, rewards: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Mean/std of the epoch's rewards over all data-parallel ranks."""
        r = rewards.detach().float()
        if self.dp_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [torch.zeros_like(r) for _ in range(self.dp_size)]
            torch.distributed.all_gather(gathered, r)
            r = torch.cat(gathered)
        return {"reward_mean": r.mean(), "reward_std": r.std(unbiased=False)}

    def _train_passes(self, prompts: List[str], rule, epoch_round: int, step_loss, reward_stats):
        """``num_inner_epochs`` shuffled passes; one optimizer step per sample batch's worth of samples."""
        pg = self.pg
        w = self.mcfg.infer.unconditional_guidance_scale
        n = len(prompts)
        tmb = pg.train_micro_batch_size
        per_step = max(self.mcfg.micro_batch_size // tmb, 1)  # train micro-batches per optimizer step
        last = {}
        for inner in range(pg.num_inner_epochs):
            g = self.generator(epoch_round, f"{self.algo}_train_{inner}")
            batches = list(iter_train_minibatches(n, tmb, rule.num_steps, pg.timestep_fraction, generator=g))
            window: List[Dict[str, torch.Tensor]] = []
            for b_i, mb in enumerate(batches):
                cond = self.backend.encode_prompts([prompts[int(k)] for k in mb.indices])
                den = self.backend.denoiser(cond, w)
                k_steps = mb.steps.shape[1]
                for col in range(k_steps):
                    loss, metrics = step_loss(mb.indices, mb.steps[:, col], rule, den)
                    if bool(torch.isfinite(loss)):
                        # each optimizer step averages over its train micro-batches and step positions
                        self.manual_backward(loss / (k_steps * per_step))
                    else:
                        self._window_bad = True
                    window.append({k: v.detach().float() for k, v in metrics.items()})
                if (b_i + 1) % per_step == 0 or b_i == len(batches) - 1:
                    logs = window_mean(window)
                    logs.update(reward_stats)
                    logs["samples_seen"] = torch.tensor(float(self.samples_seen))
                    logs["ppo_epoch"] = torch.tensor(float(self.ppo_epochs))
                    # seconds since this PPO epoch began (sampling included); the last window's value
                    # is the epoch's wall time
                    logs["epoch_time"] = torch.tensor(time.perf_counter() - self._epoch_start)
                    self._finish_accumulation_window(logs)
                    self._step_start = time.perf_counter()  # the base resets it once per window
                    last, window = logs, []
        return last.get("loss", torch.zeros(())).detach()

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def render_steps(self, prompts: List[str], seed_index: int, num_steps: int) -> torch.Tensor:
        """Policy images with ``num_steps`` deterministic DDIM steps from the validation latents."""
        inf = self.mcfg.infer
        rule = self.step_rule(num_steps)
        g = seeded_generator(self.mcfg.seed, "validation", seed_index)
        cond = self.encode(prompts)
        latents = self.backend.initial_latents(len(prompts), inf.height, inf.width, rule, generator=g)
        out = sample(self.backend.denoiser(cond, inf.unconditional_guidance_scale), rule, latents,
                     StepPlan.no_grad(rule.num_steps), eta=0.0)
        return self.decode(out.pred_x0 if self.mcfg.decode_target == "pred_x0" else out.latents)

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        if self.algo != "sdpo":
            return
        prompts = batch["prompt"]
        extra = {}
        for n in self.pg.eval_steps:
            r, _ = self.score(self.render_steps(prompts, batch_idx, int(n)), prompts)
            extra[f"reward_steps{int(n)}"] = r.cpu()
        # the TrainingReport callback writes these into metrics.json's validation entries
        self.val_outputs[-1]["extra_rewards"] = extra

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        outs = [o for o in self.val_outputs if "extra_rewards" in o]
        for key in (outs[0]["extra_rewards"] if outs else {}):
            r = torch.cat([o["extra_rewards"][key] for o in outs])
            self.log(f"val_{key}", float(r.mean()), on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["policy_gradient_state"] = {
            "algorithm": self.algo,
            "samples_seen": self.samples_seen,
            "ppo_epochs": self.ppo_epochs,
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: Dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("policy_gradient_state")
        if state is None:
            raise InputError(self.checkpoint_key(), "checkpoint has no policy_gradient_state: it was not written "
                                                    "by a ddpo/sdpo run")
        if state["algorithm"] != self.algo:
            raise InputError(self.checkpoint_key(), f"checkpoint was trained with model.algorithm={state['algorithm']}, "
                                                    f"but the config has model.algorithm={self.algo}")
        self.samples_seen = int(state["samples_seen"])
        self.ppo_epochs = int(state["ppo_epochs"])
        if self.tracker is not None and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])
