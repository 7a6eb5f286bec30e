"""Prompt sources: ``.txt`` (one prompt per line), ``.jsonl`` (a ``"prompt"`` field per line) or
``builtin:<name>`` (prompt sets shipped with the package).

Policy: blank lines and over-long lines are errors reported with their line numbers — a prompt file
with holes is more likely a broken export than an intention. The CLIP tokenizer still truncates
each prompt to 77 tokens; ``max_prompt_chars`` only guards against garbage lines.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List

from ..errors import InputError, found

BUILTIN_PROMPTS: Dict[str, Callable[[], List[str]]] = {}


def register_prompts(name: str):
    def deco(fn):
        BUILTIN_PROMPTS[name] = fn
        return fn

    return deco


@register_prompts("animals")
def _animals() -> List[str]:
    animals = ["cat", "dog", "horse", "rabbit", "fox", "owl", "turtle", "deer", "bear", "duck", "frog", "goat"]
    return [f"a photo of a {a}" for a in animals]


# trl's DDPO example (github:huggingface/trl, tag v0.23.1 = 4529a1c8, examples/scripts/ddpo.py, `animals`):
# its prompt_fn returns the bare animal name, no template, drawn uniformly with replacement.
TRL_ANIMALS = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla",
    "hedgehog", "kangaroo",
)


@register_prompts("trl_animals")
def _trl_animals() -> List[str]:
    return list(TRL_ANIMALS)


@register_prompts("embedded_train")
def _embedded_train() -> List[str]:
    from ..embedded.data import prompts

    return prompts("train")


@register_prompts("embedded_heldout")
def _embedded_heldout() -> List[str]:
    """Attribute combinations never seen in pretraining or fine-tuning."""
    from ..embedded.data import prompts

    return prompts("heldout")


@register_prompts("embedded_shapes_train")
def _embedded_shapes_train() -> List[str]:
    """The shapes benchmark's 18 single-object prompts, 8 times each (``embedded/benchmark.py``)."""
    from ..embedded.benchmark import train_prompts

    return train_prompts()


@register_prompts("embedded_shapes_eval")
def _embedded_shapes_eval() -> List[str]:
    """The shapes benchmark's 18 prompts once each (its validation set)."""
    from ..embedded.benchmark import eval_prompts

    return eval_prompts()


@register_prompts("embedded_shapes_heldout")
def _embedded_shapes_heldout() -> List[str]:
    """The shapes benchmark's 80 single-object held-out prompts."""
    from ..embedded.benchmark import heldout_prompts

    return heldout_prompts()


def _line_ranges(numbers: List[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")


def load_prompts(path: str, key: str = "model.data.train.dataset_path", max_chars: int = 1000) -> List[str]:
    """Read prompts; bad input raises :class:`InputError` of ``key`` (the config key that named ``path``)."""
    if path.startswith("builtin:"):
        name = path[len("builtin:"):]
        if name not in BUILTIN_PROMPTS:
            raise InputError(key, f"unknown built-in prompt set {name!r}; known: {sorted(BUILTIN_PROMPTS)}")
        return list(BUILTIN_PROMPTS[name]())
    if os.path.isdir(path):
        raise InputError(key, f"{path!r} is a directory, expected a prompt file (.txt or .jsonl)")
    if not os.path.isfile(path):
        raise InputError(key, f"prompt file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(key, f"cannot read prompt file {path!r}: {e}") from e
    while lines and not lines[-1].strip():  # a trailing newline is not a blank prompt
        lines.pop()
    prompts, blank, long_ = [], [], []
    for n, line in enumerate(lines, start=1):
        if path.endswith(".jsonl"):
            try:
                obj = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                raise InputError(key, f"{path}:{n}: not valid JSON ({e.msg})") from e
            if obj is not None and (not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str)):
                raise InputError(key, f"{path}:{n}: expected an object with a string field \"prompt\"")
            line = obj["prompt"] if obj is not None else ""
        text = line.strip()
        if not text:
            blank.append(n)
        elif len(text) > max_chars:
            long_.append(n)
        prompts.append(text)
    problems = found((blank, f"blank prompt on line(s) {_line_ranges(blank)}"),
                     (long_, f"prompt longer than model.data.max_prompt_chars={max_chars} on line(s) "
                             f"{_line_ranges(long_)}"))
    if problems:
        raise InputError(key, f"{path}: {problems}")
    if not prompts:
        raise InputError(key, f"prompt file {path!r} is empty")
    return prompts


class PromptDataset:
    """Map-style dataset of prompts; item i is ``{"prompt": str, "index": i}``."""

    def __init__(self, prompts: List[str]):
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Dict:
        return {"prompt": self.prompts[i], "index": i}


def collate_prompts(items: List[Dict]) -> Dict:
    return {"prompt": [it["prompt"] for it in items], "index": [it["index"] for it in items]}
