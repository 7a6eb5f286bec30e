"""Worker: our DRaFT-K (LoRA) training step on a saved pipeline, timed per step.

One step = encode prompts, sample T steps (the last K with gradient), decode x̂0, reward, backward,
clip the gradient norm to 1, AdamW step — the same core calls the Lightning shell
(``algorithms/reward_backprop.py``) makes, without the Trainer around them.

argv: pipeline_dir batch steps K kl_coeff checkpoint(0/1) warmup repeats [height] [lora_rank]
[lora_targets] [floor_repeats]

``lora_targets``: comma-separated peft target modules, or ``sdlora`` (NeMo's set, the default: the
attention projections and the feed-forward layers). ``floor_repeats`` > 0: after our timed steps, time
that many floor steps (``floor_draft.make_floor_step``) in this process on the same modules; the
reported ``peak_rss_mb`` is then the high-water mark *before* the floor ran, and the floor's numbers
are under ``floor``.

Environment: ``BENCH_SAMPLER_CHECKPOINT=torch`` makes checkpointed steps use torch's non-reentrant
checkpoint instead of the sampler's exact step node (``core.sampler.EXACT_STEP_CHECKPOINT = False``);
``BENCH_GRAPH_STATS=1`` adds ``graph`` (:func:`graph_stats` of one extra step, run after ``peak_rss_mb``
was taken).
"""
import os
import sys

from _measure import emit, fault_in, one_thread, peak_rss_mb, rss_mb, timed_steps

torch = one_thread()

from nemo_aligner_draft.backends import load_backend, lora_targets  # noqa: E402
from nemo_aligner_draft.core.draft import DraftConfig, draft_objective  # noqa: E402
from nemo_aligner_draft.core import sampler as _sampler  # noqa: E402

if os.environ.get("BENCH_SAMPLER_CHECKPOINT") == "torch":
    _sampler.EXACT_STEP_CHECKPOINT = False


def graph_stats(forward, modules) -> dict:
    """Allocator-independent size of one step's autograd graph, from one forward of ``forward()`` (→ loss):
    ``autograd_nodes`` reachable from the loss, and ``saved_mb``, the tensors autograd keeps for backward
    outside checkpointed regions (distinct storages; the modules' parameters and buffers excluded, they
    exist anyway). Backward then runs to free the graph; the caller discards the gradients."""
    resident = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    loss.backward()
    return {"autograd_nodes": len(seen), "saved_mb": sum(saved.values()) / 2**20,
            "sampler_checkpoint": "exact" if _sampler.EXACT_STEP_CHECKPOINT else "torch"}


def main():
    path, batch, steps, k, kl, ckpt, warmup, repeats = sys.argv[1:9]
    batch, steps, k, warmup, repeats = int(batch), int(steps), int(k), int(warmup), int(repeats)
    height = int(sys.argv[9]) if len(sys.argv) > 9 else 64
    rank = int(sys.argv[10]) if len(sys.argv) > 10 else 4
    targets = sys.argv[11] if len(sys.argv) > 11 else "sdlora"
    floor_repeats = int(sys.argv[12]) if len(sys.argv) > 12 else 0
    kl, ckpt = float(kl), bool(int(ckpt))
    rss_import = rss_mb()
    torch.manual_seed(0)
    backend = load_backend(path)
    # trl's DefaultDDPOStableDiffusionPipeline LoRA is r=4, alpha=4 on to_q/k/v/out.0 only: pass
    # "to_q,to_k,to_v,to_out.0" to match it; "sdlora" adds the feed-forward layers (NeMo's set).
    modules = lora_targets("sd", "sdlora") if targets == "sdlora" else [t for t in targets.split(",") if t]
    params = backend.add_lora(rank, rank, modules)
    if kl:
        backend.setup_reference(use_adapters=True)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    prompts = ["a photo of a cat", "a red bicycle"] * (batch // 2 + 1)
    prompts = prompts[:batch]
    cfg = DraftConfig(truncation_steps=k, kl_coeff=kl, checkpoint=ckpt)
    rule = backend.step_rule(steps)
    g = torch.Generator().manual_seed(0)
    w = 7.5

    def score(images):  # mean brightness, images [B,3,H,W] in [0,1] -> [B]
        return images.mean(dim=(1, 2, 3))

    rewards = []

    def step():
        cond = backend.encode_prompts(prompts)
        latents = backend.initial_latents(batch, height, height, rule, generator=g)
        ref = backend.reference_denoiser(cond, w) if kl else None
        loss, metrics, _ = draft_objective(backend.denoiser(cond, w), ref, rule, latents, backend.decode,
                                           score, cfg, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rewards.append(float(metrics["reward_mean"]))

    fault_in(backend.net, backend.vae, *backend.text_encoders)
    times, rss_before, peak_before = timed_steps(step, warmup, repeats, f"ours K={k}")
    result = {"impl": "ours", "step_s": times, "images_per_step": batch, "rss_after_import_mb": rss_import,
              "rss_before_train_mb": rss_before, "peak_rss_before_train_mb": peak_before, "rewards": rewards,
              "lora_targets": modules, "lora_params": sum(p.numel() for p in params), "checkpoint": ckpt}
    if floor_repeats:
        from floor_draft import make_floor_step

        result["peak_rss_mb"] = peak_rss_mb()  # ours alone, before the floor runs
        fstep, phases, frewards = make_floor_step(backend, params, opt, batch, steps, height, ckpt, w)
        ftimes = []
        for i in range(floor_repeats):
            ftimes.append(fstep(True))
            print(f"  floor: step {i + 1}/{floor_repeats} {ftimes[-1]:.3f} s "
                  + " ".join(f"{n} {v[-1]:.2f}" for n, v in phases.items()), file=sys.stderr, flush=True)
        result["floor"] = {"step_s": ftimes, "phases_s": phases, "rewards": frewards,
                           "peak_rss_mb_after": peak_rss_mb(), "rss_before_mb": rss_before}
    if os.environ.get("BENCH_GRAPH_STATS") == "1":
        result.setdefault("peak_rss_mb", peak_rss_mb())  # the extra step below is not in the measurement

        def forward():
            cond = backend.encode_prompts(prompts)
            latents = backend.initial_latents(batch, height, height, rule, generator=g)
            ref = backend.reference_denoiser(cond, w) if kl else None
            return draft_objective(backend.denoiser(cond, w), ref, rule, latents, backend.decode, score, cfg,
                                   generator=g)[0]

        result["graph"] = graph_stats(forward, [backend.net, backend.vae, *backend.text_encoders])
        opt.zero_grad(set_to_none=True)
    emit(result)


if __name__ == "__main__":
    main()
