"""Training recipes (one file per family: :mod:`.reward_backprop`, :mod:`.policy_gradient`) and the
algorithm registry (:mod:`.registry`) that names them."""
from .registry import ALGORITHMS, Algorithm, get_algorithm, register_algorithm  # noqa: F401
