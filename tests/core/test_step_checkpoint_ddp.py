"""Exact step checkpointing under DistributedDataParallel (2 CPU ranks, gloo).

As under Lightning's DDP strategy, DDP wraps the module whose forward is the whole training step (here:
a K = T checkpointed rollout and a DRaFT-shaped loss), so the UNet's LoRA parameters are used once per
sampler step inside one DDP forward. DDP's reducer counts a parameter ready when its AccumulateGrad
runs; with the exact step node that happens once per backward, and the all-reduced gradient equals the
mean of the ranks' plain (un-checkpointed) gradients. Negative control: torch's reentrant checkpoint
runs a nested backward per step, so the reducer sees each parameter ready once per step: DDP refuses
that or (torch 2.14, measured here) all-reduces too early and returns a wrong gradient.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from nemo_aligner_draft.backends import load_backend, lora_targets
from nemo_aligner_draft.core.sampler import StepPlan, model_step, sample

T = 3
W = 3.0


class RolloutLoss(torch.nn.Module):
    """forward(x) = loss of one K = T rollout from latents x; mode: plain / exact / reentrant."""

    def __init__(self, backend, cond, rule, mode):
        super().__init__()
        self.net = backend.net  # registers the LoRA parameters with DDP
        self.backend, self.cond, self.rule, self.mode = backend, cond, rule, mode

    def forward(self, x):
        den = self.backend.denoiser(self.cond, W)
        if self.mode == "reentrant":
            xi, eps = x.clone().requires_grad_(True), []  # else step 0's output has no gradient
            for i in range(T):
                xi, e, x0, _ = torch_checkpoint(model_step, den, self.rule, xi, i, None, 0.0, False,
                                                use_reentrant=True)
                eps.append(e)
            return x0.square().mean() + torch.stack([e.square().mean() for e in eps]).mean()
        out = sample(den, self.rule, x, StepPlan.last_k(T, T), checkpoint=self.mode == "exact")
        return out.pred_x0.square().mean() + torch.stack([e.square().mean() for e in out.eps]).mean()


def _worker(rank, world, port, sd_dir, result_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same LoRA init on every rank (DDP also broadcasts rank 0's)
        b = load_backend(sd_dir)
        params = b.add_lora(4, 4.0, lora_targets("sd", "sdlora"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in b.net.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        rule = b.step_rule(T)
        cond = b.encode_prompts(["a red cube", "a blue sphere"])
        x = b.initial_latents(2, 64, 64, rule, generator=torch.Generator().manual_seed(100 + rank))

        # reference: this rank's plain gradient, averaged over ranks by hand
        loss = RolloutLoss(b, cond, rule, "plain")(x)
        expected = torch.autograd.grad(loss, params)
        for e in expected:
            dist.all_reduce(e)
            e /= world

        result = {}
        ddp = torch.nn.parallel.DistributedDataParallel(RolloutLoss(b, cond, rule, "exact"))
        ddp(x).backward()
        got = [p.grad.clone() for p in params]
        result["exact_err"] = max(float((a - e).abs().max()) for a, e in zip(got, expected))
        result["scale"] = max(float(e.abs().max()) for e in expected)
        for p in params:
            p.grad = None

        ddp_r = torch.nn.parallel.DistributedDataParallel(RolloutLoss(b, cond, rule, "reentrant"))
        try:
            ddp_r(x).backward()
            result["reentrant_error"] = None
            result["reentrant_err"] = max(float((p.grad - e).abs().max()) for p, e in zip(params, expected))
        except RuntimeError as err:
            result["reentrant_error"] = str(err)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_all_reduces_the_exact_checkpointed_gradients_once(tiny_sd_dir, tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), tiny_sd_dir, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in results:
        assert r["scale"] > 0
        assert r["exact_err"] <= 1e-5 * r["scale"], r
        # the mechanism the exact node avoids: one nested backward per step re-marks the parameters
        # the mechanism the exact node avoids: one nested backward per step makes the reducer see each
        # parameter ready T times; DDP either refuses ("marked ... ready ... twice") or, as torch 2.14
        # does here, all-reduces after the first and returns a wrong gradient
        assert (r["reentrant_error"] is not None and "ready" in r["reentrant_error"]
                or r["reentrant_err"] > 0.1 * r["scale"]), r
