"""Record which config keys code reads, so a test can fail on a key nothing reads."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Optional, Set

_READS: Optional[Set[str]] = None


class Node:
    """Base of every schema dataclass. ``_path`` is the dotted key of this node ("model.infer")."""

    _path: str = ""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        reads = _READS
        if reads is not None and not name.startswith("_") and name in object.__getattribute__(self, "__dataclass_fields__"):
            path = object.__getattribute__(self, "_path")
            reads.add(f"{path}.{name}" if path else name)
        return value


@contextmanager
def track_reads():
    """``with track_reads() as reads:`` collects dotted keys read from any config node."""
    global _READS
    previous, _READS = _READS, set()
    try:
        yield _READS
    finally:
        _READS = previous


def leaf_keys(node: Node, prefix: str = ""):
    """All dotted leaf keys present in a typed config tree."""
    for f in dataclasses.fields(node):
        value = object.__getattribute__(node, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(value, Node):
            yield from leaf_keys(value, key)
        elif isinstance(value, list) and value and isinstance(value[0], Node):
            for i, v in enumerate(value):
                yield from leaf_keys(v, key)
        else:
            yield key
