"""Prompt sources and the resumable, data-parallel-aware prompt sampler."""
from .prompts import PromptDataset, load_prompts  # noqa: F401
from .sampler import PromptSampler  # noqa: F401
