"""NeMo ModelPT (LightningModule) shells: thin, one per algorithm family."""
from nemo.core.classes import common as _nemo_common

# NeMo refuses to instantiate classes outside its allow-list when restoring a .nemo archive.
if "nemo_aligner_draft." not in _nemo_common.ALLOWED_TARGET_PREFIXES:
    _nemo_common.ALLOWED_TARGET_PREFIXES.append("nemo_aligner_draft.")
