"""Exact per-step checkpointing of the sampler (``core.sampler._CheckpointedStep``) on a tiny SD.

Each checkpointed step is one autograd node whose backward recomputes the step. Checked here against
the plain (un-checkpointed) loop: gradients for the LoRA parameters and for conditioning that
requires grad (full chain K = T, so step 0's input does not require grad; eta > 0; AlignProp's
per-step detach; CPU bf16 autocast; LoRA dropout, i.e. RNG inside the denoiser), the size of the
autograd graph in T, one AccumulateGrad per parameter per backward, ``torch.autograd.grad``, and the
fallbacks to torch's checkpoint. Where a property could hold by accident, a negative control breaks
the mechanism and shows the check then fails.

The loss everywhere is DRaFT-shaped but on latents (no VAE, so float64 stays float64): a fixed smooth
reward of the last step's x̂0 plus a penalty on every grad step's ε̂.
"""
import contextlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from nemo_aligner_draft.backends import load_backend, lora_targets
from nemo_aligner_draft.core import sampler as S
from nemo_aligner_draft.core.sampler import StepPlan, model_step, sample

W = 3.0
PROMPTS = ["a red cube", "a blue sphere"]
PX = 64  # latents 8×8


def randomize_lora_b(unet, seed=0, std=0.05):
    """Random B matrices (peft zero-initialises them, which would zero most LoRA gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def lora_params(backend):
    return [p for n, p in backend.unet.named_parameters() if "lora_" in n]


def latents(backend, rule, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return backend.initial_latents(len(PROMPTS), PX, PX, rule, generator=g).to(dtype)


def conditioning_requiring_grad(backend, dtype):
    """Prompt embeddings as a leaf that requires grad (a trainable text encoder / prompt tuning)."""
    cond = backend.encode_prompts(PROMPTS)
    h = cond.cond["encoder_hidden_states"].to(dtype).clone().requires_grad_(True)
    cond.cond["encoder_hidden_states"] = h
    cond.uncond = {k: v.to(dtype) for k, v in cond.uncond.items()}
    return cond, h


def draft_loss(out, x0_weight):
    x0 = out.pred_x0.float() if out.pred_x0.dtype == torch.bfloat16 else out.pred_x0
    reward = (x0 * x0_weight).flatten(1).mean(1) - (x0**2).flatten(1).mean(1)
    penalty = torch.stack([(e.to(x0.dtype) ** 2).mean() for e in out.eps]).mean() if out.eps else 0.0
    return -reward.mean() + 0.3 * penalty


def weight_like(x):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(
        torch.float32 if x.dtype == torch.bfloat16 else x.dtype)


def flat(grads, like):
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten().double() for g, p in zip(grads, like)])


def rel_err(got, expected):
    scale = expected.abs().max()
    assert scale > 0, "reference gradient is identically zero: the comparison would be vacuous"
    return float((got - expected).abs().max() / scale)


def run(backend, cond, x, plan, mode, *, eta=0.0, w=W, autocast=None, wrt=(), sampler_rule=None):
    """One rollout + loss. mode: "plain" (no checkpoint), "exact" (the new node), "torch" (torch's
    non-reentrant checkpoint, via the module switch). autocast: None, or the ``cache_enabled`` of a CPU
    bf16 autocast region around the rollout. Returns (loss, grads of ``wrt``, SampleOutput)."""
    rule = sampler_rule or backend.step_rule(plan.num_steps)
    den = backend.denoiser(cond, w)
    if mode == "exact":
        assert S.denoiser_grad_tensors(den) is not None
    old = S.EXACT_STEP_CHECKPOINT
    S.EXACT_STEP_CHECKPOINT = mode != "torch"
    try:
        ctx = (contextlib.nullcontext() if autocast is None
               else torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=autocast))
        with ctx:
            out = sample(den, rule, x, plan, eta=eta, generator=torch.Generator().manual_seed(7),
                         checkpoint=mode != "plain")
        loss = draft_loss(out, weight_like(x))  # backward outside the autocast region, as in training
    finally:
        S.EXACT_STEP_CHECKPOINT = old
    grads = torch.autograd.grad(loss, list(wrt), allow_unused=True) if wrt else None
    return loss, grads, out


@pytest.fixture(scope="module")
def backend64(tiny_sd_dir):
    b = load_backend(tiny_sd_dir, frozen_dtype=torch.float64)
    b.add_lora(4, 4.0, lora_targets("sd", "sdlora"))
    randomize_lora_b(b.unet)
    b.unet.to(torch.float64)
    return b


@pytest.fixture(scope="module")
def backend32(tiny_sd_dir):
    b = load_backend(tiny_sd_dir)
    b.add_lora(4, 4.0, lora_targets("sd", "sdlora"))
    randomize_lora_b(b.unet)
    return b


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("sampler,eta,w,mask", [
    ("ddim", 0.0, W, None),
    ("ddim", 0.7, W, None),                                  # eta-noise drawn outside the node
    ("ddim", 0.7, 1.0, None),                                # no CFG: the conditioning leaf itself is read
    ("ddim", 0.5, W, [False, True, False, True, True]),      # AlignProp per-step detach
    ("euler", 0.0, W, [True, False, True, False, False]),
])
def test_full_chain_gradients_equal_the_plain_loop(backend64, sampler, eta, w, mask):
    b = backend64
    T = 5
    rule = b.step_rule(T, sampler)
    cond, h = conditioning_requiring_grad(b, torch.float64)
    x = latents(b, rule, torch.float64)
    assert not x.requires_grad  # step 0's input carries no gradient
    plan = StepPlan.last_k(T, T) if mask is None else StepPlan.per_step_detach(mask)
    wrt = lora_params(b) + [h]
    loss_p, g_p, out_p = run(b, cond, x, plan, "plain", eta=eta, w=w, wrt=wrt, sampler_rule=rule)
    loss_e, g_e, out_e = run(b, cond, x, plan, "exact", eta=eta, w=w, wrt=wrt, sampler_rule=rule)
    assert out_e.grad_steps == out_p.grad_steps == plan.grad_steps
    torch.testing.assert_close(loss_e, loss_p, rtol=1e-12, atol=0)
    # parameters and the conditioning leaf separately: a lost conditioning gradient must not hide
    # behind the (larger) parameter gradients
    assert rel_err(flat(g_e[:-1], wrt[:-1]), flat(g_p[:-1], wrt[:-1])) < 1e-10
    assert rel_err(g_e[-1].double(), g_p[-1].double()) < 1e-10
    if mask is not None:
        # the first step's output is live: its parameter gradient reaches the loss only through the
        # latent chain of the detached steps after it
        assert flat(g_p[:-1], wrt[:-1]).abs().max() > 0


def test_step_zero_gradient_is_kept(backend64):
    """With K = T and only step 0 live, all the gradient comes through step 0, whose input (the
    initial noise) does not require grad — the case reentrant checkpointing gets wrong."""
    b = backend64
    T = 4
    rule = b.step_rule(T)
    cond, h = conditioning_requiring_grad(b, torch.float64)
    x = latents(b, rule, torch.float64)
    plan = StepPlan.per_step_detach([False, True, True, True])
    wrt = lora_params(b) + [h]
    _, g_p, _ = run(b, cond, x, plan, "plain", wrt=wrt)
    _, g_e, _ = run(b, cond, x, plan, "exact", wrt=wrt)
    expected = flat(g_p, wrt)
    assert expected.abs().max() > 0
    assert rel_err(flat(g_e, wrt), expected) < 1e-10


def test_bf16_autocast_recompute_runs_under_the_forward_autocast(backend32, monkeypatch):
    """Forward under CPU bf16 autocast, backward outside it (as in training): the recomputation must
    re-enter the forward's autocast. Without autocast's weight-cast cache the checkpointed chain runs
    the plain loop's ops exactly. With the cache (autocast's default) the plain loop casts each weight
    to bf16 once for all T steps and sums the T steps' weight gradients in bf16 before the cast back,
    while each recomputed step has its own cast, so the steps are summed in fp32: the two differ by
    bf16 rounding of that sum (~2⁻⁸ relative), the checkpointed one being the more precise."""
    b = backend32
    T = 4
    rule = b.step_rule(T)
    cond, h = conditioning_requiring_grad(b, torch.float32)
    x = latents(b, rule, torch.float32)
    plan = StepPlan.last_k(T, T)
    wrt = lora_params(b) + [h]

    def errors(got, expected):
        return (rel_err(flat(got[:-1], wrt[:-1]), flat(expected[:-1], wrt[:-1])),
                rel_err(got[-1].double(), expected[-1].double()))

    loss_p, g_p, out_p = run(b, cond, x, plan, "plain", eta=0.5, autocast=False, wrt=wrt)
    assert out_p.eps[0].dtype == torch.bfloat16  # autocast really was on
    loss_e, g_e, _ = run(b, cond, x, plan, "exact", eta=0.5, autocast=False, wrt=wrt)
    torch.testing.assert_close(loss_e, loss_p, rtol=1e-6, atol=0)
    err_params, err_cond = errors(g_e, g_p)
    assert err_params < 1e-5 and err_cond < 1e-5, (err_params, err_cond)

    _, g_pc, _ = run(b, cond, x, plan, "plain", eta=0.5, autocast=True, wrt=wrt)
    _, g_ec, _ = run(b, cond, x, plan, "exact", eta=0.5, autocast=True, wrt=wrt)
    cached = errors(g_ec, g_pc)
    assert max(cached) < 1.5e-2, cached

    # negative control: recomputing without the forward's autocast gives a visibly different gradient
    monkeypatch.setattr(S, "_autocast_state", lambda device: ([("cpu", False, torch.bfloat16)], False))
    off = errors(run(b, cond, x, plan, "exact", eta=0.5, autocast=False, wrt=wrt)[1], g_p)
    assert min(off) > 1e-3, off


def test_rng_inside_the_denoiser_is_replayed(tiny_sd_dir, monkeypatch):
    """LoRA dropout draws from the global RNG inside the UNet call: the recomputation must draw the
    same masks as the step's forward did."""
    b = load_backend(tiny_sd_dir, frozen_dtype=torch.float64)
    b.add_lora(4, 4.0, lora_targets("sd", "sdlora"), dropout=0.3)
    randomize_lora_b(b.unet)
    b.unet.to(torch.float64).train()
    T = 3
    rule = b.step_rule(T)
    cond, _ = conditioning_requiring_grad(b, torch.float64)
    x = latents(b, rule, torch.float64)
    plan = StepPlan.last_k(T, T)
    wrt = lora_params(b)

    def grads(mode):
        torch.manual_seed(1234)
        return flat(run(b, cond, x, plan, mode, wrt=wrt)[1], wrt)

    g_p = grads("plain")
    assert rel_err(grads("exact"), g_p) < 1e-10
    monkeypatch.setattr(S, "_rng_restored", lambda state: contextlib.nullcontext())
    assert rel_err(grads("exact"), g_p) > 1e-3  # negative control: other masks, other gradient


# ----------------------------------------------------------------------------- graph size
def count_nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def test_graph_is_flat_in_sampler_steps(backend32):
    """Nodes reachable from the outputs at T = 10 and 50 (forward only). Exact: the chain x → x̂0 adds
    exactly one node per step (the step; its edges go to the same parameter AccumulateGrads), the
    DRaFT-shaped loss at most 6 (the node + the per-step penalty's few ops). Torch's non-reentrant
    checkpoint records every op of the step: hundreds of nodes per step on this tiny UNet."""
    b = backend32
    cond = b.encode_prompts(PROMPTS)
    counts = {}
    for mode in ("exact", "torch"):
        for T in (10, 50):
            rule = b.step_rule(T)
            _, _, out = run(b, cond, latents(b, rule, torch.float32), StepPlan.last_k(T, T), mode, eta=0.5)
            loss = draft_loss(out, weight_like(out.pred_x0))
            counts[mode, T] = (count_nodes(out.pred_x0), count_nodes(loss))
    chain_per_step = (counts["exact", 50][0] - counts["exact", 10][0]) / 40
    loss_per_step = (counts["exact", 50][1] - counts["exact", 10][1]) / 40
    torch_per_step = (counts["torch", 50][0] - counts["torch", 10][0]) / 40
    assert chain_per_step == 1, counts
    assert loss_per_step <= 6, counts
    assert torch_per_step >= 200, counts


# ----------------------------------------------------------------------------- DDP-safety, autograd.grad
def test_each_parameter_accumulates_once_per_backward(backend32):
    """DDP's reducer counts a parameter ready when its AccumulateGrad runs: it must run once per
    backward, not once per step. Negative control: torch's reentrant checkpoint runs one nested
    backward per step, so a parameter used by every step accumulates T times."""
    b = backend32
    T = 4
    rule = b.step_rule(T)
    cond = b.encode_prompts(PROMPTS)
    x = latents(b, rule, torch.float32)
    params = lora_params(b)
    calls = {id(p): 0 for p in params}
    handles = [p.register_post_accumulate_grad_hook(lambda p: calls.__setitem__(id(p), calls[id(p)] + 1))
               for p in params]
    try:
        loss, _, _ = run(b, cond, x, StepPlan.last_k(T, T), "exact", eta=0.5)
        loss.backward()
        assert set(calls.values()) == {1}
        exact_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        loss_p, _, _ = run(b, cond, x, StepPlan.last_k(T, T), "plain", eta=0.5)
        loss_p.backward()
        plain_grads = [p.grad.clone() for p in params]
        assert rel_err(flat(exact_grads, params), flat(plain_grads, params)) < 1e-5

        for p in params:
            p.grad = None
        calls.update({k: 0 for k in calls})
        den = b.denoiser(cond, W)
        xi = x.clone().requires_grad_(True)  # else step 0's output, and so the chain, has no gradient
        for i in range(T):
            xi, _, _, _ = torch_checkpoint(model_step, den, rule, xi, i, None, 0.0, False, use_reentrant=True)
        xi.square().mean().backward()
        assert set(calls.values()) == {T}
    finally:
        for hd in handles:
            hd.remove()
        for p in params:
            p.grad = None


def test_autograd_grad_through_the_chain(backend64):
    b = backend64
    T = 4
    rule = b.step_rule(T)
    cond, h = conditioning_requiring_grad(b, torch.float64)
    x = latents(b, rule, torch.float64)
    params = lora_params(b)
    _, grads, _ = run(b, cond, x, StepPlan.last_k(T, T), "exact", eta=0.5, wrt=params)
    assert all(p.grad is None for p in params) and h.grad is None  # grad() accumulates nothing
    assert all(g is not None for g in grads)
    loss2, _, _ = run(b, cond, x, StepPlan.last_k(T, T), "exact", eta=0.5)
    loss2.backward()
    try:
        assert rel_err(flat(grads, params), flat([p.grad for p in params], params)) < 1e-12
        assert h.grad is not None and h.grad.abs().max() > 0
    finally:
        for p in params:
            p.grad = None


# ----------------------------------------------------------------------------- guards and fallbacks
def test_an_incomplete_grad_tensors_list_raises(backend32):
    b = backend32
    T = 3
    rule = b.step_rule(T)
    cond = b.encode_prompts(PROMPTS)
    den = b.denoiser(cond, W)
    listed = lora_params(b)[::2]  # half the trainable parameters
    den.grad_tensors = listed
    out = sample(den, rule, latents(b, rule, torch.float32), StepPlan.last_k(T, T), checkpoint=True)
    with pytest.raises(RuntimeError, match="not in its grad_tensors"):
        out.pred_x0.square().mean().backward()


def test_in_place_change_of_a_parameter_before_backward_raises(backend32):
    b = backend32
    T = 2
    rule = b.step_rule(T)
    out = sample(b.denoiser(b.encode_prompts(PROMPTS), W), rule, latents(b, rule, torch.float32),
                 StepPlan.last_k(T, T), checkpoint=True)
    p = lora_params(b)[0]
    try:
        with torch.no_grad():
            p.add_(1.0)
        with pytest.raises(RuntimeError, match="modified in place"):
            out.pred_x0.square().mean().backward()
    finally:
        with torch.no_grad():
            p.sub_(1.0)
        for q in lora_params(b):
            q.grad = None


def test_fallbacks_use_torch_checkpoint_with_the_same_gradients(backend32, monkeypatch):
    """No ``grad_tensors`` (a hand-written denoiser, or a backend with exact_step_checkpoint = False)
    → torch's non-reentrant checkpoint: a graph of hundreds of nodes per step, same gradients."""
    b = backend32
    T = 3
    rule = b.step_rule(T)
    cond = b.encode_prompts(PROMPTS)
    x = latents(b, rule, torch.float32)
    params = lora_params(b)
    backend_den = b.denoiser(cond, W)
    assert callable(backend_den.grad_tensors)
    assert {id(t) for t in S.denoiser_grad_tensors(backend_den)} == {id(p) for p in params}

    monkeypatch.setattr(b, "exact_step_checkpoint", False, raising=False)
    off = b.denoiser(cond, W)
    assert not hasattr(off, "grad_tensors")
    monkeypatch.undo()

    def hand_written(x_in, t):
        return backend_den(x_in, t)

    plan = StepPlan.last_k(T, T)
    results = {}
    for name, den in (("backend", backend_den), ("switched off", off), ("hand-written", hand_written)):
        out = sample(den, rule, x, plan, checkpoint=True)
        loss = draft_loss(out, weight_like(x))
        results[name] = (count_nodes(out.pred_x0), flat(torch.autograd.grad(loss, params), params))
    assert results["backend"][0] < 3 * T + len(params) + 50
    for name in ("switched off", "hand-written"):
        assert results[name][0] > 200 * T, name
        assert rel_err(results[name][1], results["backend"][1]) < 1e-5, name
