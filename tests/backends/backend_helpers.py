"""Small helpers shared by the backend tests (no test logic of their own)."""
from typing import Dict, List

import torch

from nemo_aligner_draft.backends import lora_targets


def add_random_lora(backend, seed: int = 0, rank: int = 4, scale: float = 0.05) -> List[torch.nn.Parameter]:
    """LoRA on the UNet with B drawn at random (not zero) so that the policy differs from the
    reference and the gradient reaches A as well as B."""
    params = backend.add_lora(rank, float(rank), lora_targets("sd", "sdlora"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backend.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return params


def lora_grads(unet) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def zero_grads(unet) -> None:
    for p in unet.parameters():
        p.grad = None


def decode_by_hand(vae, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' convention: vae.decode(z / scaling_factor) in [-1, 1], mapped to [0, 1]."""
    return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def assert_grads_close(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], rtol: float, atol: float):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def grad_distance(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all tensors."""
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5
