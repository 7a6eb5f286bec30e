"""Config helpers the tests share."""
from typing import Dict, Iterator


def yaml_leaves(d: Dict, prefix: str = "") -> Iterator[str]:
    """Dotted leaf keys of a YAML mapping, as the typed config names them (a ``kwargs`` mapping is one
    leaf: its keys are the reward factory's, not the config's)."""
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and k != "kwargs":
            yield from yaml_leaves(v, key)
        else:
            yield key
