"""Reward models: a registry of factories, each returning a :class:`~.base.Reward`."""
from .base import REWARDS, Reward, build_reward, check_reward_output, register_reward, require_differentiable  # noqa: F401
from . import aesthetic, builtin, clip, jpeg, weighted  # noqa: F401  (register the rewards)
from . import nemo_rm  # noqa: F401  (registers nemo_clip: NeMo-Aligner's CLIP reward model .nemo)
from . import imagereward  # noqa: F401  (registers imagereward: THUDM's released ImageReward.pt)
from ..embedded import rewards as _embedded_rewards  # noqa: F401,E402  (registers embedded_clip_score, embedded_aesthetic)
from ..embedded import benchmark as _embedded_benchmark  # noqa: F401,E402  (registers embedded_shape, embedded_shape_checker)
