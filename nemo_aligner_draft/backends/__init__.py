"""Model backends: one interface (:class:`~.base.DiffusionBackend`), one implementation per family."""
from .base import Conditioning, DiffusionBackend, load_backend  # noqa: F401
