"""Fixtures for the algorithm-core tests: a tiny SD backend loaded through the real loader, with
LoRA adapters whose B matrices are random (peft zero-initialises B, which would make every LoRA
gradient but B's vanish and the DRaFT+ penalty identically zero)."""
import pytest
import torch

from nemo_aligner_draft.backends import load_backend
from nemo_aligner_draft.backends import lora_targets


def randomize_lora_b(unet, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


@pytest.fixture
def make_backend(tiny_sd_dir):
    """``make_backend(lora=True, dtype=torch.float32)`` → a fresh backend with reference set up."""

    def make(lora: bool = True, dtype: torch.dtype = torch.float32, rank: int = 4, seed: int = 0):
        backend = load_backend(tiny_sd_dir, frozen_dtype=dtype)
        if lora:
            backend.add_lora(rank, float(rank), lora_targets("sd", "sdlora"))
            randomize_lora_b(backend.unet, seed)
        backend.unet.to(dtype)
        backend.setup_reference(use_adapters=lora)
        return backend

    return make


@pytest.fixture
def reward_fn():
    """A fixed smooth differentiable reward on images ``[B,3,H,W]`` → ``[B]`` (no clamp, no kinks)."""
    cache = {}

    def score(images: torch.Tensor) -> torch.Tensor:
        key = (tuple(images.shape[1:]), images.dtype)
        if key not in cache:
            g = torch.Generator().manual_seed(123)
            cache[key] = (torch.randn(images.shape[1:], generator=g, dtype=torch.float64).to(images.dtype),
                          torch.rand(images.shape[1:], generator=g, dtype=torch.float64).to(images.dtype))
        w, target = cache[key]
        return (images * w).flatten(1).mean(1) - ((images - target) ** 2).flatten(1).mean(1)

    return score
