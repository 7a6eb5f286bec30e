"""Two data-parallel ranks (gloo, CPU processes) agree on what an optimizer step does.

* Skipping: rank 1's loss is NaN, rank 0's is finite. Each rank still runs its backward (DDP's all-reduce is a
collective), and the skip decision is all-reduced over the data-parallel group, so rank 0 skips too and
both keep identical weights — without the agreement rank 0 would step and the replicas would part.
* Clipping with sharded gradients (FSDP: each rank holds its shard): the norm clipped is that of the
  whole gradient, summed over the ranks' shards, so both ranks scale by the same factor, the one torch's
  clip_grad_norm_ computes on the unsharded gradient.
"""
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _window_model(weight, opt, backwards, sharded=False):
    return SimpleNamespace(
        dp_size=2, dp_group=None, device=torch.device("cpu"), consumed_samples=0, nan_skipped_steps=0,
        overflow_skipped_steps=0, mcfg=SimpleNamespace(micro_batch_size=1), gradients_sharded=sharded,
        backend=SimpleNamespace(trainable_parameters=lambda: [weight]),
        trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None)),
        manual_backward=lambda loss: (backwards.append(float(loss.detach())), loss.backward()),
        optimizers=lambda: opt, lr_schedulers=lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        log=lambda *a, **k: None, log_dict=lambda *a, **k: None)


def _rank(rank, port, out):
    from nemo_aligner_draft.algorithms.optimizer_step import OptimizerStep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    weight = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    opt = torch.optim.SGD([weight], lr=0.1)
    backwards = []
    model = _window_model(weight, opt, backwards)
    step = OptimizerStep(model, gradient_clip_val=0.0, nan_tolerance=5)
    loss = weight.sum() * (float("nan") if rank == 1 else 1.0)
    step.backward(loss, {"loss": torch.tensor(0.0)})
    skipped = step.finish() is None
    # and a window where both are finite steps on both
    step.backward(weight.sum(), {"loss": torch.tensor(0.0)})
    stepped = step.finish() is not None
    # sharded: rank 0 holds the shard [3, 4] of the gradient, rank 1 the shard [12]: whole norm 13
    shard = torch.nn.Parameter(torch.tensor([0.0, 0.0]) if rank == 0 else torch.tensor([0.0]))
    sopt = torch.optim.SGD([shard], lr=1.0)
    sharded = _window_model(shard, sopt, [], sharded=True)
    sstep = OptimizerStep(sharded, gradient_clip_val=1.0, nan_tolerance=5)
    grad = torch.tensor([3.0, 4.0]) if rank == 0 else torch.tensor([12.0])
    sstep.backward((shard * grad).sum(), {"loss": torch.tensor(0.0)})
    logs = sstep.finish()
    torch.save({"skipped": skipped, "stepped": stepped, "backwards": backwards, "weight": weight.detach(),
                "nan_skipped_steps": model.nan_skipped_steps, "sharded_norm": logs["grad_norm"],
                "shard": shard.detach(), "grad": grad}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(ranks):
    r0, r1 = ranks
    assert r0["skipped"] and r1["skipped"], "rank 0's finite loss did not step alone"
    assert r0["nan_skipped_steps"] == r1["nan_skipped_steps"] == 1
    assert len(r0["backwards"]) == len(r1["backwards"]) == 2, "every rank ran every backward"
    assert r1["backwards"][0] == 0.0  # the NaN loss was replaced by a zero one
    assert r0["stepped"] and r1["stepped"]
    assert torch.equal(r0["weight"], r1["weight"])
    torch.testing.assert_close(r0["weight"], torch.tensor([0.4, -0.35]))  # one SGD step of gradient 1


def test_sharded_gradients_are_clipped_by_their_global_norm(ranks):
    r0, r1 = ranks
    assert abs(r0["sharded_norm"] - 13.0) < 1e-5 and abs(r1["sharded_norm"] - 13.0) < 1e-5
    whole = torch.nn.Parameter(torch.zeros(3))
    (whole * torch.cat([r0["grad"], r1["grad"]])).sum().backward()
    torch.nn.utils.clip_grad_norm_([whole], 1.0)
    torch.testing.assert_close(torch.cat([r0["shard"], r1["shard"]]), -whole.grad, rtol=0, atol=1e-7)
