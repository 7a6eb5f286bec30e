"""Prompt sources (lists in memory, webdataset shards streamed) and the resumable, data-parallel-aware
prompt sampler. :func:`open_prompt_source` is the entry point (see :mod:`.source`)."""
from .interface import PromptSource  # noqa: F401
from .prompts import PromptDataset, load_prompts  # noqa: F401
from .sampler import PromptSampler  # noqa: F401
from .source import ListPromptSource, as_prompt_source, open_prompt_source  # noqa: F401
