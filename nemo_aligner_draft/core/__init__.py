"""Algorithm core: pure PyTorch (plus diffusers scheduler configs). No NeMo, Lightning or Hydra."""
