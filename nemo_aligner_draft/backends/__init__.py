"""Model backends: one interface (:class:`~.base.DiffusionBackend`), one file per family (``sd.py``,
``sdxl.py``) and the family registry (:mod:`.registry`) that recognises a pipeline directory."""
from .base import Conditioning, DiffusionBackend  # noqa: F401
from .registry import FAMILIES, Family, detect_family, get_family, load_backend, lora_targets, register_family  # noqa: F401
