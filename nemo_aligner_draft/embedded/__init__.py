"""The embedded default: a tiny text-to-image model, its tokenizer and rewards, shipped with the package.

* :mod:`.data` — the procedural shapes domain (renderer, caption grammar, train / held-out prompts).
* :mod:`.models` — architectures and the shipped paths: ``pipeline_path()`` (diffusers SD pipeline,
  load it with ``nemo_aligner_draft.backends.load_backend``) and ``tinyclip_path()`` (HF ``CLIPModel``).
* :mod:`.rewards` — ``embedded_clip_score`` and ``embedded_aesthetic`` (registered on
  ``import nemo_aligner_draft.rewards``).
* :mod:`.diversity` — TinyCLIP mean pairwise cosine distance.
* :mod:`.checker` — analytic colour / shape / background / count checker, independent of TinyCLIP.
* :mod:`.pretrain` — the CPU pretraining that produced the shipped weights
  (``examples/mm/stable_diffusion/pretrain_embedded.py``). See ``README.md`` here for the numbers.
"""
