"""NeMo ModelPT (LightningModule) shells: thin, one per algorithm family."""
