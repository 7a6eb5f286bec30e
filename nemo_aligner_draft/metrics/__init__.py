"""Evaluation metrics (no gradients): sample diversity per prompt."""
from .diversity import EmbeddingDiversity, LpipsDiversity, diversity_per_prompt, mean_pairwise  # noqa: F401
