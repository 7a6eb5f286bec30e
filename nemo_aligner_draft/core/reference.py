"""The frozen reference ε_ref of DRaFT+.

With LoRA the reference is the policy's own UNet with its adapters switched off: no second copy in
memory. With full fine-tuning it is a frozen deep copy taken before training starts.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch


class ReferenceModel:
    """``with ref.view() as unet:`` yields the module that computes ε_ref (always under no_grad)."""

    def __init__(self, policy_unet: torch.nn.Module, use_adapters: bool):
        self.policy_unet = policy_unet
        self.use_adapters = use_adapters
        self.frozen = None
        if not use_adapters:
            self.frozen = copy.deepcopy(policy_unet).requires_grad_(False).eval()

    @contextmanager
    def view(self):
        if self.frozen is not None:
            with torch.no_grad():
                yield self.frozen
            return
        self.policy_unet.disable_adapters()
        try:
            with torch.no_grad():
                yield self.policy_unet
        finally:
            self.policy_unet.enable_adapters()
