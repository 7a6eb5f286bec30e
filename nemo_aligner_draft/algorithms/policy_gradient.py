"""The policy-gradient recipe: DDPO and SDPO (``model.algorithm`` ddpo | sdpo).

One Lightning ``training_step`` is one PPO *epoch* (DDPO's outer loop):

1. **Sample** ``num_sample_batches`` micro-batches of ``model.micro_batch_size`` prompts each with the
   stochastic DDIM sampler (``model.infer.eta > 0``), without gradient, storing the per-step
   log-probabilities (:func:`..core.ddpo.ddpo_rollout`; SDPO: a *pair* of rollouts per prompt from the
   same x_T, :func:`..core.sdpo.sdpo_paired_rollout`).
2. **Score**: DDPO scores the final images (the reward need not be differentiable, e.g. JPEG size);
   SDPO scores every step's one-step x̂0 prediction (dense rewards) and discounts them.
3. **Advantages** from per-prompt statistics (:class:`..core.stat_tracking.PerPromptStatTracker`;
   SDPO: per prompt and step) or batch statistics when ``per_prompt_stat_tracking`` is false.
4. **Train** ``num_inner_epochs`` passes over the stored samples, shuffled into train micro-batches of
   ``train_micro_batch_size``; each train micro-batch visits a random ``timestep_fraction`` of its
   steps, one backward per step position (PPO-clip loss, :func:`..core.ddpo.ddpo_step_loss`; SDPO:
   :func:`..core.sdpo.sdpo_step_loss`).

Optimizer steps follow DDPO's accumulation: gradients are accumulated over the train micro-batches
that make up one sample batch's worth of samples (``micro_batch_size`` samples × the visited steps)
and then one optimizer step is taken. A training_step therefore takes ``num_inner_epochs ×
num_sample_batches`` optimizer steps, and Lightning's ``max_steps`` (which counts optimizer steps in
manual optimisation) counts those. The data loader hands each rank ``micro_batch_size ×
num_sample_batches`` prompts per training_step.

All randomness (initial latents, eta-noise, shuffling, step orders) comes from
``model.generator(round, purpose)``, so a run is a function of ``model.seed`` and its position in the
prompt stream. The stat tracker's buffers are saved in the checkpoint.

An algorithm of this family implements :meth:`PolicyGradientRecipe.collect`: sample and score one
epoch's rollouts and return the per-train-batch loss.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..core.ddpo import Rollout, ddpo_rollout, ddpo_step_loss, iter_train_minibatches
from ..core.sdpo import dense_rewards, discounted_returns, sdpo_advantages, sdpo_paired_rollout, sdpo_step_loss
from ..core.stat_tracking import PerPromptStatTracker, batch_advantages
from ..errors import InputError
from .optimizer_step import OptimizerStep

_log = logging.getLogger("nemo_aligner_draft")

# (train-batch sample indices [b], their step indices [b], rule, denoiser, the batch's conditioning)
#   -> (loss, metrics)
StepLoss = Callable[[torch.Tensor, torch.Tensor, object, object, object], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


def cat_rollouts(parts: List[Rollout]) -> Rollout:
    """Concatenate rollouts along the sample axis (timesteps are shared)."""
    px = None if parts[0].pred_x0_steps is None else torch.cat([p.pred_x0_steps for p in parts])
    return Rollout(torch.cat([p.latents for p in parts]), torch.cat([p.next_latents for p in parts]),
                   torch.cat([p.log_probs for p in parts]), parts[0].timesteps,
                   torch.cat([p.final for p in parts]), px)


class PolicyGradientRecipe:
    """The PPO-epoch loop; subclasses collect rollouts and give the step loss."""

    state_key = "policy_gradient_state"  # where the checkpoint keeps this recipe's state

    def __init__(self, model):
        self.model = model
        self.algo = model.mcfg.algorithm
        self.pg = model.mcfg.section()
        self.step = OptimizerStep(model, model.loop.gradient_clip_val, model.mcfg.nan_tolerance)
        self.tracker: Optional[PerPromptStatTracker] = None
        if self.pg.per_prompt_stat_tracking:
            self.tracker = PerPromptStatTracker(self.pg.stat_buffer_size, self.pg.stat_min_count)
        self.samples_seen = 0  # images generated for training, all ranks (SDPO: both trajectories)
        self.ppo_epochs = 0
        self._epoch_start = 0.0
        self._told_deterministic = False

    # ------------------------------------------------------------------ what an algorithm implements
    def collect(self, chunks: List[List[str]], epoch_round: int) -> Tuple[List[str], object, StepLoss, Dict, int]:
        """Sample and score one epoch: returns (prompts in sample order, the sampler rule, the step loss,
        reward statistics to log, the number of trainable (stochastic) steps of the rollouts)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data
    @property
    def prompts_per_step(self) -> int:
        """Prompts one rank draws per training_step (one PPO epoch)."""
        return self.pg.prompts_per_epoch(self.model.mcfg.micro_batch_size)[0]

    def chunk_prompts(self, prompts: List[str]) -> List[List[str]]:
        """The epoch's prompts as sample batches of ``micro_batch_size`` (GRPO repeats each into a group)."""
        mbs = self.model.mcfg.micro_batch_size
        return [prompts[i:i + mbs] for i in range(0, len(prompts), mbs)]

    def planned_batches(self, max_steps: int) -> int:
        return max_steps  # an upper bound: each epoch takes several optimizer steps

    def check_prompts(self, num_prompts: int) -> None:
        per_rank, how = self.pg.prompts_per_epoch(self.model.mcfg.micro_batch_size)
        need = per_rank * self.model.dp_size
        if num_prompts < need:
            raise InputError(f"model.{self.algo}.num_sample_batches",
                             f"one PPO epoch draws {how} × data-parallel size = {need} prompts, but "
                             f"model.data.train.dataset_path has only {num_prompts}")

    # ------------------------------------------------------------------ one PPO epoch
    def training_step(self, batch, batch_idx):
        model = self.model
        prompts: List[str] = list(batch["prompt"])
        self._epoch_start = time.perf_counter()
        self.step.start()
        epoch_round = model.consumed_samples // (self.prompts_per_step * model.dp_size)
        prompts, rule, step_loss, reward_stats, train_steps = self.collect(self.chunk_prompts(prompts), epoch_round)
        model.consumed_samples += self.prompts_per_step * model.dp_size
        if train_steps < rule.num_steps and not self._told_deterministic:
            self._told_deterministic = True
            _log.info(f"{self.algo}: the last {rule.num_steps - train_steps} of {rule.num_steps} sampler steps are "
                     f"deterministic at model.infer.eta={model.mcfg.infer.eta} (the DDIM schedule ends on "
                     f"alpha_cumprod 1: the scheduler's set_alpha_to_one); training on the first {train_steps}")
        loss = self._train_passes(prompts, rule, train_steps, epoch_round, step_loss, reward_stats)
        self.ppo_epochs += 1
        return loss

    def rollout_round(self, epoch_round: int, j: int) -> int:
        """A distinct round index per (epoch, sample batch) for the seeded generators."""
        return epoch_round * self.pg.num_sample_batches + j

    def advantages(self, prompts: List[str], rewards: torch.Tensor) -> torch.Tensor:
        if self.tracker is not None:
            return self.tracker.update(prompts, rewards)
        return batch_advantages(rewards)

    def reward_stats(self, rewards: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Mean/std of the epoch's rewards over all data-parallel ranks."""
        r = rewards.detach().float()
        dp = self.model.dp_size
        if dp > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [torch.zeros_like(r) for _ in range(dp)]
            torch.distributed.all_gather(gathered, r, group=self.model.dp_group)
            r = torch.cat(gathered)
        return {"reward_mean": r.mean(), "reward_std": r.std(unbiased=False)}

    def _train_passes(self, prompts: List[str], rule, train_steps: int, epoch_round: int, step_loss: StepLoss,
                      reward_stats):
        """``num_inner_epochs`` shuffled passes; one optimizer step per sample batch's worth of samples."""
        model, pg = self.model, self.pg
        w = model.mcfg.infer.unconditional_guidance_scale
        tmb = pg.train_micro_batch_size
        per_step = max(model.mcfg.micro_batch_size // tmb, 1)  # train micro-batches per optimizer step
        last: Dict = {}
        for inner in range(pg.num_inner_epochs):
            g = model.generator(epoch_round, f"{self.algo}_train_{inner}")
            batches = list(iter_train_minibatches(len(prompts), tmb, train_steps, pg.timestep_fraction, generator=g))
            for b_i, mb in enumerate(batches):
                cond = model.backend.encode_prompts([prompts[int(k)] for k in mb.indices])
                den = model.backend.denoiser(cond, w)
                k_steps = mb.steps.shape[1]
                for col in range(k_steps):
                    loss, metrics = step_loss(mb.indices, mb.steps[:, col], rule, den, cond)
                    # each optimizer step averages over its train micro-batches and step positions
                    self.step.backward(loss, metrics, 1.0 / (k_steps * per_step))
                if (b_i + 1) % per_step == 0 or b_i == len(batches) - 1:
                    # seconds since this PPO epoch began (sampling included): the last window's is the epoch's
                    extra = {**reward_stats, "samples_seen": torch.tensor(float(self.samples_seen)),
                             "ppo_epoch": torch.tensor(float(self.ppo_epochs)),
                             "epoch_time": torch.tensor(time.perf_counter() - self._epoch_start)}
                    logs = self.step.finish(extra)
                    last = logs or last
        return torch.tensor(last.get("train_loss", 0.0))

    # ------------------------------------------------------------------ hooks of the shell
    @torch.no_grad()
    def validation_extras(self, prompts: List[str], batch_idx: int) -> Dict[str, torch.Tensor]:
        """The reward at each of the section's ``eval_steps`` deterministic DDIM step counts from the
        validation latents, fine-tuned (``reward_steps<n>``) and base (``reward_steps<n>_base``, the
        reference model from the same latents): SDPO's few-step claim, and DDPO's beside it."""
        model, out = self.model, {}
        for n in self.pg.eval_steps:
            for suffix, reference in (("", False), ("_base", True)):
                images = model.render(prompts, batch_idx, use_reference=reference, num_steps=int(n))
                out[f"reward_steps{int(n)}{suffix}"] = model.score(images, prompts)[0].cpu()
        return out

    def state_dict(self) -> Dict:
        return {"algorithm": self.algo, "samples_seen": self.samples_seen, "ppo_epochs": self.ppo_epochs,
                "tracker": self.tracker.state_dict() if self.tracker is not None else None}

    def load_state_dict(self, state: Optional[Dict]) -> None:
        key = self.model.checkpoint_key()
        if state is None:
            raise InputError(key, "checkpoint has no policy_gradient_state: it was not written by a ddpo/sdpo run")
        if state["algorithm"] != self.algo:
            raise InputError(key, f"checkpoint was trained with model.algorithm={state['algorithm']}, "
                                  f"but the config has model.algorithm={self.algo}")
        self.samples_seen = int(state["samples_seen"])
        self.ppo_epochs = int(state["ppo_epochs"])
        if self.tracker is not None and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])


class DDPORecipe(PolicyGradientRecipe):
    """DDPO (PPO-clip on the denoising MDP), final-image rewards."""

    def collect(self, chunks, epoch_round):
        model = self.model
        eta = model.mcfg.infer.eta
        w = model.mcfg.infer.unconditional_guidance_scale
        rollouts, rewards = [], []
        for j, chunk in enumerate(chunks):
            rule, cond, latents, g = model.sampling_setup(chunk, self.rollout_round(epoch_round, j), "rollout")
            ro = ddpo_rollout(model.backend.denoiser(cond, w), rule, latents, eta, generator=g)
            with torch.no_grad():
                r, _ = model.score(model.decode(ro.final), chunk)
            rollouts.append(ro)
            rewards.append(r.detach())
        rollout = cat_rollouts(rollouts)
        rewards_t = torch.cat(rewards)
        prompts = [p for c in chunks for p in c]
        adv = self.advantages(prompts, rewards_t).to(rollout.log_probs.device)
        self.samples_seen += len(prompts) * model.dp_size

        def step_loss(idx, steps, rule, den, cond):
            return ddpo_step_loss(den, rule, rollout.select(idx.to(rollout.final.device)), adv[idx], steps,
                                  self.pg, eta)

        return prompts, rule, step_loss, self.reward_stats(rewards_t), rollout.num_steps


class SDPORecipe(PolicyGradientRecipe):
    """SDPO (stepwise dense reward differences between paired trajectories)."""

    def collect(self, chunks, epoch_round):
        model = self.model
        eta = model.mcfg.infer.eta
        w = model.mcfg.infer.unconditional_guidance_scale
        firsts, seconds, returns1, returns2, finals = [], [], [], [], []
        for j, chunk in enumerate(chunks):
            rule, cond, latents, g = model.sampling_setup(chunk, self.rollout_round(epoch_round, j), "rollout")
            first, second = sdpo_paired_rollout(model.backend.denoiser(cond, w), rule, latents, eta, generator=g)
            for ro, out in ((first, returns1), (second, returns2)):
                step_prompts = [p for p in chunk for _ in range(rule.num_steps)]  # row b·T + t is prompt b
                dense = dense_rewards(ro.pred_x0_steps, model.decode,
                                      lambda imgs, ps=step_prompts: model.score(imgs, ps)[0])
                out.append(discounted_returns(dense, self.pg.gamma))
            finals.append(torch.cat([returns1[-1][:, -1], returns2[-1][:, -1]]))
            firsts.append(first)
            seconds.append(second)
        first, second = cat_rollouts(firsts), cat_rollouts(seconds)
        prompts = [p for c in chunks for p in c]
        adv1, adv2 = sdpo_advantages(torch.cat(returns1), torch.cat(returns2), prompts, self.tracker)
        dev = first.log_probs.device
        adv1, adv2 = adv1.to(dev), adv2.to(dev)
        self.samples_seen += 2 * len(prompts) * model.dp_size

        def step_loss(idx, steps, rule, den, cond):
            i = idx.to(dev)
            return sdpo_step_loss(den, rule, first.select(i), second.select(i), adv1[idx], adv2[idx], steps,
                                  self.pg, eta)

        # the last step's x̂0 is the final image: its (undiscounted) reward is the sample's reward
        return prompts, rule, step_loss, self.reward_stats(torch.cat(finals)), min(first.num_steps, second.num_steps)

