"""Gradient correctness of the sampler and the DRaFT family objectives on a tiny SD (CPU, 1 thread).

References used here, all independent of ``core.sampler.sample``:
* an explicit DDIM loop written in this file (own ᾱ bookkeeping, own CFG UNet call, own update,
  ``no_grad`` on the truncated prefix) — for DRaFT-K, AlignProp's per-step detach and DRaFT-LV;
* central finite differences in float64 — for the DRaFT+ loss and its penalty;
* the plain (non-checkpointed) backward pass — for per-step checkpointing.

Comparisons against the explicit loop run the UNet chain in float64 (the backend's decode returns
float32 images), so a tolerance of 1e-6 relative to the largest gradient entry leaves room only for
float32 rounding of the images; the checkpointing comparison runs in float32.
"""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from nemo_aligner_draft.core.draft import DraftConfig, draft_objective
from nemo_aligner_draft.core.losses import draftp_loss
from nemo_aligner_draft.core.sampler import StepPlan, sample

W = 3.0  # CFG scale
PROMPTS = ["a red cube", "a blue sphere"]
PX = 64  # image side; latents are 8×8


def lora_params(backend):
    return [p for n, p in backend.unet.named_parameters() if "lora_" in n]


def initial_latents(backend, rule, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return backend.initial_latents(len(PROMPTS), PX, PX, rule, generator=g).to(dtype)


def flat_grads(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def assert_grads_close(got, expected, rtol):
    """Relative to the largest entry: per-entry rtol is meaningless for entries that are ~0."""
    scale = expected.abs().max()
    assert scale > 0, "reference gradient is identically zero: the check would be vacuous"
    err = (got - expected).abs().max() / scale
    assert err <= rtol, f"max |Δgrad| / max |grad| = {err:.3g} > {rtol}"


# ----------------------------------------------------------------------------- explicit reference
class ExplicitDDIM:
    """DDIM written out from the scheduler's ᾱ table (Song et al. 2021, eq. 12), no core code."""

    def __init__(self, backend, num_steps):
        sched = DDIMScheduler.from_config(backend.scheduler.config)
        sched.set_timesteps(num_steps)
        alphas = sched.alphas_cumprod.double()
        self.timesteps = [int(t) for t in sched.timesteps]
        self.a = [float(alphas[t]) for t in self.timesteps]
        final = 1.0 if sched.config.set_alpha_to_one else float(alphas[0])
        self.a_prev = self.a[1:] + [final]
        self.backend = backend
        self.num_steps = num_steps

    def cfg_eps(self, cond, x, i, adapters=True):
        unet = self.backend.unet
        hidden = torch.cat([cond.uncond["encoder_hidden_states"], cond.cond["encoder_hidden_states"]])
        t = torch.tensor(self.timesteps[i])
        if not adapters:
            unet.disable_adapters()
        try:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=hidden.to(x.dtype)).sample
        finally:
            if not adapters:
                unet.enable_adapters()
        uncond, text = out.chunk(2)
        return uncond + W * (text - uncond)

    def update(self, x, eps, i, eta=0.0, noise=None):
        a, a_prev = self.a[i], self.a_prev[i]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x_next = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        if sigma > 0:
            x_next = x_next + sigma * noise
        return x_next, x0

    def rollout(self, cond, x, *, grad_from, eta=0.0, generator=None, detach_mask=None, kl=0.0):
        """Steps < grad_from under no_grad; with ``detach_mask`` the UNet output of masked steps is a
        constant but the latent chain keeps its graph. Returns (final x, last x̂0, penalty terms)."""
        penalties = []
        x0 = None
        for i in range(self.num_steps):
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) if eta > 0 else None
            live = i >= grad_from
            with torch.set_grad_enabled(live):
                eps = self.cfg_eps(cond, x, i)
                if detach_mask is not None and detach_mask[i]:
                    eps = eps.detach()
                x_next, x0 = self.update(x, eps, i, eta, noise)
            if live and kl and not (detach_mask is not None and detach_mask[i]):
                with torch.no_grad():
                    eps_ref = self.cfg_eps(cond, x.detach(), i, adapters=False)
                penalties.append(((eps - eps_ref) ** 2).mean())
            x = x_next
        return x, x0, penalties


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.5), ("euler", 0.0)])
def test_checkpointed_full_chain_equals_plain_backprop(make_backend, reward_fn, sampler, eta):
    b = make_backend()
    T = 4
    rule = b.step_rule(T, sampler)
    cond = b.encode_prompts(PROMPTS)
    x = initial_latents(b, rule)
    params = lora_params(b)
    results = []
    for checkpoint in (False, True):
        cfg = DraftConfig(truncation_steps=T, kl_coeff=0.3, eta=eta, checkpoint=checkpoint)
        loss, metrics, _ = draft_objective(b.denoiser(cond, W), b.reference_denoiser(cond, W), rule, x,
                                           b.decode, reward_fn, cfg, generator=torch.Generator().manual_seed(7))
        assert metrics["kl_penalty"] > 0
        results.append((loss.detach(), flat_grads(loss, params)))
    (loss_plain, g_plain), (loss_ckpt, g_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=0)
    assert_grads_close(g_ckpt, g_plain, rtol=1e-5)


@pytest.mark.parametrize("k,decode_target,eta,kl", [
    (1, "pred_x0", 0.0, 0.0),
    (2, "x0", 0.0, 0.5),
    (3, "pred_x0", 0.7, 0.5),
    (4, "x0", 0.0, 0.2),
])
def test_truncated_k_gradient_equals_explicit_loop(make_backend, reward_fn, k, decode_target, eta, kl):
    b = make_backend(dtype=torch.float64)
    T = 4
    rule = b.step_rule(T)
    cond = b.encode_prompts(PROMPTS)
    x = initial_latents(b, rule, dtype=torch.float64)
    params = lora_params(b)

    cfg = DraftConfig(truncation_steps=k, kl_coeff=kl, eta=eta, decode_target=decode_target)
    loss, _, _ = draft_objective(b.denoiser(cond, W), b.reference_denoiser(cond, W), rule, x, b.decode,
                                 reward_fn, cfg, generator=torch.Generator().manual_seed(11))
    got = flat_grads(loss, params)

    ref = ExplicitDDIM(b, T)
    x_final, x0_last, penalties = ref.rollout(cond, x, grad_from=T - k, eta=eta, kl=kl,
                                              generator=torch.Generator().manual_seed(11))
    assert len(penalties) == (k if kl else 0)
    images = b.decode(x0_last if decode_target == "pred_x0" else x_final)
    ref_loss = -reward_fn(images).mean() + (kl * torch.stack(penalties).mean() if kl else 0.0)
    expected = flat_grads(ref_loss, params)

    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(got, expected, rtol=1e-6)


def _frozen_by_timestep(fn, cache, frozen_steps):
    """Wrap a denoiser so that calls at ``frozen_steps`` (timestep values) replay ``cache``: the
    quantities the method treats as constants stay fixed while finite differences perturb θ."""

    def wrapped(x_in, t):
        key = int(t)
        if key in frozen_steps:
            if key not in cache:
                cache[key] = fn(x_in, t).detach()
            return cache[key]
        return fn(x_in, t)

    return wrapped


@pytest.mark.parametrize("k,checkpoint", [(3, True), (2, False)])
def test_draftp_loss_and_penalty_gradients_match_finite_differences(make_backend, k, checkpoint):
    """Autograd of L = −mean r + kl·penalty equals central differences of the same L in float64, where
    (as the method defines its gradient) the no-grad prefix x_{T−K} and ε_ref are held at their θ0 values."""
    b = make_backend(dtype=torch.float64)
    T = 3
    rule = b.step_rule(T)
    cond = b.encode_prompts(PROMPTS)
    x = initial_latents(b, rule, dtype=torch.float64)
    sf = b.vae.config.scaling_factor

    def decode64(z):  # the backend's decode returns float32; keep float64 for precise differences
        return b.vae.decode(z / sf).sample / 2 + 0.5

    g = torch.Generator().manual_seed(5)
    w_r = torch.randn(2, 3, PX, PX, generator=g, dtype=torch.float64)

    def reward(images):
        return (images * w_r).flatten(1).mean(1) + (images**2).flatten(1).mean(1)

    prefix_ts = {int(rule.timesteps[i]) for i in range(T - k)}
    all_ts = {int(t) for t in rule.timesteps}
    policy_cache, ref_cache = {}, {}
    policy = _frozen_by_timestep(b.denoiser(cond, W), policy_cache, prefix_ts)
    reference = _frozen_by_timestep(b.reference_denoiser(cond, W), ref_cache, all_ts)
    kl = 2.0

    def losses():
        out = sample(policy, rule, x, StepPlan.last_k(T, k), reference=reference, checkpoint=checkpoint)
        r = reward(decode64(out.pred_x0))
        full, metrics = draftp_loss(r, out.eps, out.eps_ref, kl)
        penalty_only, _ = draftp_loss(torch.zeros_like(r), out.eps, out.eps_ref, kl)
        return full, penalty_only, metrics

    params = lora_params(b)
    full, penalty_only, metrics = losses()
    assert metrics["kl_penalty"] > 1e-6
    assert len(ref_cache) == k  # ε_ref was evaluated exactly at the grad steps
    g_full = torch.autograd.grad(full, params, retain_graph=True)
    g_pen = torch.autograd.grad(penalty_only, params)

    # A few coordinates from A and B matrices of different modules, where the gradient is not tiny.
    names = [n for n, p in b.unet.named_parameters() if "lora_" in n]
    a_idx = [i for i, n in enumerate(names) if "lora_A" in n]
    b_idx = [i for i, n in enumerate(names) if "lora_B" in n]
    picks = [(pi, int(g_pen[pi].abs().flatten().argmax())) for pi in (a_idx[0], b_idx[0], a_idx[-1], b_idx[-1])]

    h = 1e-4  # float64: round-off dominates below ~1e-5, truncation error is ~1e-8 here
    for pi, j in picks:
        flat = params[pi].data.view(-1)
        orig = flat[j].item()
        with torch.no_grad():
            flat[j] = orig + h
            plus = losses()
            flat[j] = orig - h
            minus = losses()
            flat[j] = orig
        fd_full = (plus[0] - minus[0]).item() / (2 * h)
        fd_pen = (plus[1] - minus[1]).item() / (2 * h)
        ad_full = g_full[pi].flatten()[j].item()
        ad_pen = g_pen[pi].flatten()[j].item()
        assert abs(ad_pen) > 1e-8
        assert fd_pen == pytest.approx(ad_pen, rel=1e-6, abs=1e-12), (pi, j)
        assert fd_full == pytest.approx(ad_full, rel=1e-6, abs=1e-12), (pi, j)


def test_lora_gradients_only_on_adapters_and_reference_never_changes(make_backend, reward_fn):
    b = make_backend()
    T = 4
    rule = b.step_rule(T)
    cond = b.encode_prompts(PROMPTS)
    x = initial_latents(b, rule)
    cfg = DraftConfig(truncation_steps=2, kl_coeff=0.5)

    probe_x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    probe_t = rule.timesteps[1]
    with torch.no_grad():
        ref_before = b.reference_denoiser(cond, W)(probe_x, probe_t).clone()
        policy_before = b.denoiser(cond, W)(probe_x, probe_t).clone()
    base_before = {n: p.detach().clone() for n, p in b.unet.named_parameters() if "lora_" not in n}
    # Random B makes the adapters active: the reference view must really switch them off.
    assert not torch.allclose(ref_before, policy_before)

    loss, _, _ = draft_objective(b.denoiser(cond, W), b.reference_denoiser(cond, W), rule, x, b.decode,
                                 reward_fn, cfg)
    loss.backward()
    for name, p in b.unet.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert sum(float(p.grad.abs().sum()) for p in lora_params(b)) > 0
    for module in [b.vae, *b.text_encoders]:
        assert all(p.grad is None for p in module.parameters())

    opt = torch.optim.AdamW(lora_params(b), lr=1e-2)
    opt.step()
    opt.zero_grad()
    for _ in range(2):
        loss, _, _ = draft_objective(b.denoiser(cond, W), b.reference_denoiser(cond, W), rule, x, b.decode,
                                     reward_fn, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad()

    with torch.no_grad():
        ref_after = b.reference_denoiser(cond, W)(probe_x, probe_t)
        policy_after = b.denoiser(cond, W)(probe_x, probe_t)
    assert torch.equal(ref_after, ref_before)
    assert (policy_after - policy_before).abs().max() > 1e-4
    for name, p in b.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_before[name]), name


def test_full_finetune_frozen_reference_copy_never_changes(make_backend, reward_fn):
    b = make_backend(lora=False)
    ref_model = b.reference_model
    assert ref_model.frozen is not None
    params = b.set_full_finetune()
    policy_ptrs = {p.data_ptr() for p in b.unet.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in ref_model.frozen.parameters()}

    T = 3
    rule = b.step_rule(T)
    cond = b.encode_prompts(PROMPTS)
    x = initial_latents(b, rule)
    probe_x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    probe_t = rule.timesteps[0]
    frozen_before = {k: v.clone() for k, v in ref_model.frozen.state_dict().items()}
    with torch.no_grad():
        ref_before = b.reference_denoiser(cond, W)(probe_x, probe_t).clone()
        policy_before = b.denoiser(cond, W)(probe_x, probe_t).clone()
    torch.testing.assert_close(ref_before, policy_before, rtol=0, atol=0)  # a copy of the start point

    opt = torch.optim.AdamW(params, lr=1e-3)
    cfg = DraftConfig(truncation_steps=1, kl_coeff=0.5)
    for _ in range(2):
        loss, metrics, _ = draft_objective(b.denoiser(cond, W), b.reference_denoiser(cond, W), rule, x,
                                           b.decode, reward_fn, cfg)
        loss.backward()
        assert all(p.grad is None for p in ref_model.frozen.parameters())
        opt.step()
        opt.zero_grad()
    assert metrics["kl_penalty"] > 0  # after one step the policy has moved away from the copy

    for k, v in ref_model.frozen.state_dict().items():
        assert torch.equal(v, frozen_before[k]), k
    with torch.no_grad():
        ref_after = b.reference_denoiser(cond, W)(probe_x, probe_t)
        policy_after = b.denoiser(cond, W)(probe_x, probe_t)
    assert torch.equal(ref_after, ref_before)
    assert (policy_after - policy_before).abs().max() > 1e-4


def test_alignprop_per_step_detach_keeps_the_latent_chain(make_backend, reward_fn):
    b = make_backend(dtype=torch.float64)
    T = 4
    rule = b.step_rule(T)
    cond = b.encode_prompts(PROMPTS)
    x = initial_latents(b, rule, dtype=torch.float64)
    params = lora_params(b)
    policy = b.denoiser(cond, W)
    ref = ExplicitDDIM(b, T)

    # Only step 0's UNet output is live; steps 1..3 outputs are constants but x_1 → x_4 keeps its graph,
    # so the reward still reaches θ through step 0.
    mask = [False, True, True, True]
    out = sample(policy, rule, x, StepPlan.per_step_detach(mask))
    assert out.grad_steps == [0]
    got = flat_grads(-reward_fn(b.decode(out.latents)).mean(), params)
    x_final, _, _ = ref.rollout(cond, x, grad_from=0, detach_mask=mask)
    expected = flat_grads(-reward_fn(b.decode(x_final)).mean(), params)
    assert got.abs().max() > 0
    assert_grads_close(got, expected, rtol=1e-6)

    # The same step flagged live but the later steps under no_grad: the chain is cut, nothing reaches θ.
    cut = sample(policy, rule, x, StepPlan([True, False, False, False], [False] * 4))
    assert not cut.latents.requires_grad

    # Detaching every output but the last is exactly DRaFT-1 (x_3 no longer depends on θ).
    last_live = sample(policy, rule, x, StepPlan.per_step_detach([True, True, True, False]))
    draft1 = sample(policy, rule, x, StepPlan.last_k(T, 1))
    assert_grads_close(flat_grads(-reward_fn(b.decode(last_live.pred_x0)).mean(), params),
                       flat_grads(-reward_fn(b.decode(draft1.pred_x0)).mean(), params), rtol=1e-6)


@pytest.mark.parametrize("T", [1, 4, 6])
def test_from_cut_is_last_k(T):
    for cut in range(T + 1):
        plan = StepPlan.from_cut(T, cut)
        assert plan.grad == [i >= cut for i in range(T)]
        assert plan.grad == StepPlan.last_k(T, T - cut).grad
        assert plan.detach_output == [False] * T
        assert plan.grad_steps == list(range(cut, T))
    with pytest.raises(ValueError, match="truncation_steps"):
        StepPlan.last_k(T, T + 1)


def test_draft_lv_gradient_equals_explicit_renoise_computation(make_backend, reward_fn):
    b = make_backend(dtype=torch.float64)
    T, copies, kl = 4, 2, 0.3
    rule = b.step_rule(T)
    cond = b.encode_prompts(PROMPTS)
    x = initial_latents(b, rule, dtype=torch.float64)
    params = lora_params(b)

    cfg = DraftConfig(lv_copies=copies, kl_coeff=kl)
    loss, metrics, _ = draft_objective(b.denoiser(cond, W), b.reference_denoiser(cond, W), rule, x, b.decode,
                                       reward_fn, cfg, generator=torch.Generator().manual_seed(21))
    got = flat_grads(loss, params)

    ref = ExplicitDDIM(b, T)
    with torch.no_grad():
        x_final, _, _ = ref.rollout(cond, x, grad_from=T)
    g = torch.Generator().manual_seed(21)
    last = T - 1
    a = ref.a[last]
    per_copy = []
    for _ in range(copies):
        noise = torch.randn(x_final.shape, generator=g, dtype=x_final.dtype)
        x1 = math.sqrt(a) * x_final + math.sqrt(1 - a) * noise
        eps = ref.cfg_eps(cond, x1, last)
        with torch.no_grad():
            eps_ref = ref.cfg_eps(cond, x1, last, adapters=False)
        x0_hat = (x1 - math.sqrt(1 - a) * eps) / math.sqrt(a)
        per_copy.append(-reward_fn(b.decode(x0_hat)).mean() + kl * ((eps - eps_ref) ** 2).mean())
    ref_loss = torch.stack(per_copy).mean()
    expected = flat_grads(ref_loss, params)

    assert metrics["kl_penalty"] > 0
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(got, expected, rtol=1e-6)
    # Two copies really are two different draws (averaging one copy twice would also "match" n=1).
    single = draft_objective(b.denoiser(cond, W), b.reference_denoiser(cond, W), rule, x, b.decode, reward_fn,
                             DraftConfig(lv_copies=1, kl_coeff=kl), generator=torch.Generator().manual_seed(21))[0]
    torch.testing.assert_close(single.detach(), per_copy[0].detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(per_copy[0], per_copy[1])


def test_both_decode_targets_give_distinct_nonzero_gradients(make_backend, reward_fn):
    b = make_backend()
    rule = b.step_rule(4)
    cond = b.encode_prompts(PROMPTS)
    x = initial_latents(b, rule)
    params = lora_params(b)
    grads = {}
    for target in ("pred_x0", "x0"):
        loss, _, _ = draft_objective(b.denoiser(cond, W), None, rule, x, b.decode, reward_fn,
                                     DraftConfig(truncation_steps=1, decode_target=target))
        grads[target] = flat_grads(loss, params)
        assert grads[target].abs().max() > 0
    assert not torch.allclose(grads["pred_x0"], grads["x0"])
