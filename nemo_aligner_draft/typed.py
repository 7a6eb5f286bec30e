"""Typed configuration sections: one dataclass per section, carrying its own constraints.

Why dataclasses and a small walker rather than pydantic: validation must report *every* problem of a
config in one attempt with its dotted key — including the cross-field rules, which pydantic skips as soon
as any field of the model failed — and the project's test that every key in ``conf/`` is read needs a
hook on attribute access, which a plain ``__getattribute__`` gives. The walker is this file.

A section is a ``@dataclass`` subclass of :class:`Section` whose fields are declared with :func:`setting`
(a default plus constraints: ``choices``, ``ge``/``gt``/``le``/``lt``, ``multiple_of``, ``expected``
wording, ``aliases``). Cross-field rules of a section are its ``rules()`` method, yielding
``(relative key, message)`` pairs; the walker prefixes the section's dotted path. A section may also
hold sub-sections that registries add at run time (``extra_sections()``: ``model.<algorithm>``,
``trainer.<loop>``) — they are read like fields and validated like fields.

:func:`build` turns a plain dict into a section tree and collects every problem; constructing a
section directly in code (``DDPOConfig(clip_range=0.1)``) checks the same constraints and raises.
This module imports nothing of the package: ``core/`` can use it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import typing
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

MISSING = "???"
_BUILDING: contextvars.ContextVar[bool] = contextvars.ContextVar("building", default=False)
_READS: Optional[Set[str]] = None


# --------------------------------------------------------------------------- declaring fields
def setting(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, choices=None, ge=None, gt=None,
            le=None, lt=None, multiple_of=None, expected: Optional[str] = None,
            aliases: Union[Sequence[str], Dict[str, Optional[Callable]]] = (), convert: Optional[Callable] = None,
            doc: str = "") -> Any:
    """A section field: its default and the constraints its value must meet.

    ``choices`` may be a callable (evaluated at validation time, for registries). ``expected`` replaces
    the generated wording of a range or choice problem. ``aliases`` are other keys accepted for it: a
    plain name is another key of the same section; a dotted key is a path from the root of the tree
    (another project's name for the same thing, e.g. NeMo-Aligner's ``model.sampling.base.steps``). A
    mapping gives each alias a converter from the alias's value to the field's (it may raise
    ``ValueError`` with a message saying what it accepts); ``convert`` does the same for the field's own
    key (another project's spelling of the value under the same name)."""
    alias_map = dict(aliases) if isinstance(aliases, dict) else {a: None for a in aliases}
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "multiple_of": multiple_of,
            "expected": expected, "aliases": tuple(a for a in alias_map if "." not in a),
            "moved_from": {a: c for a, c in alias_map.items() if "." in a}, "converters": alias_map, "convert": convert,
            "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


ANY_VALUE = type("AnyValue", (), {"__repr__": lambda self: "any value"})()


@dataclasses.dataclass(frozen=True)
class Notice:
    """A key accepted without an effect here (another project's key that means nothing in this one).
    With ``only`` set, any other value is a problem: accepting it silently would change results."""

    reason: str
    only: Any = ANY_VALUE


class Section:
    """Base of every config dataclass. ``_path`` is its dotted key ("model.infer"); reads of its fields
    are recorded while :func:`track_reads` is active. ``notices`` lists keys of this section that are
    accepted with a notice (:class:`Notice`)."""

    _path: str = ""
    notices: typing.ClassVar[Dict[str, Notice]] = {}

    def __post_init__(self):
        object.__setattr__(self, "_extra", {})
        if _BUILDING.get():
            return
        problems: List[Tuple[str, str]] = []
        _check_node(self, problems)
        if problems:
            raise ValueError("; ".join(f"{k}: {m}" if k else m for k, m in problems))

    @classmethod
    def extra_sections(cls) -> Dict[str, type]:
        """Sub-sections registered at run time: key → Section class (each optional, default None)."""
        return {}

    def rules(self) -> Iterable[Tuple[str, str]]:
        """Cross-field rules of this section: yield (key relative to the section, message)."""
        return ()

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        reads = _READS
        if reads is not None and not name.startswith("_") and name in object.__getattribute__(self, "__dataclass_fields__"):
            _record(reads, object.__getattribute__(self, "_path"), name)
        return value

    def __getattr__(self, name):  # only reached for names that are not fields: the extra sections
        if name.startswith("_"):
            raise AttributeError(name)
        extras = type(self).extra_sections()
        if name not in extras:
            raise AttributeError(f"{type(self).__name__} has no key {name!r}")
        if _READS is not None:
            _record(_READS, object.__getattribute__(self, "_path"), name)
        return object.__getattribute__(self, "__dict__").get("_extra", {}).get(name)


def _record(reads: Set[str], path: str, name: str) -> None:
    reads.add(f"{path}.{name}" if path else name)


@contextlib.contextmanager
def track_reads():
    """``with track_reads() as reads:`` collects the dotted keys read from any config section."""
    global _READS
    previous, _READS = _READS, set()
    try:
        yield _READS
    finally:
        _READS = previous


def leaf_keys(node: Section, prefix: str = "") -> Iterator[str]:
    """All dotted leaf keys present in a typed config tree."""
    for name, value in _children(node):
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, Section):
            yield from leaf_keys(value, key)
        elif isinstance(value, list) and value and isinstance(value[0], Section):
            for v in value:
                yield from leaf_keys(v, key)
        else:
            yield key


def _children(node: Section) -> Iterator[Tuple[str, Any]]:
    for f in dataclasses.fields(node):
        yield f.name, object.__getattribute__(node, f.name)
    for name, value in object.__getattribute__(node, "__dict__").get("_extra", {}).items():
        yield name, value


# --------------------------------------------------------------------------- building from a dict
def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin in (list, List):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, key: str, problems: List[Tuple[str, str]]):
    if isinstance(value, str) and value == MISSING:
        problems.append((key, f"mandatory value missing (the config has ???; set it, e.g. {key}=...)"))
        return None
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            problems.append((key, f"must not be null (expected {type_name(tp)})"))
            return None
        for a in (a for a in args if a is not type(None)):  # first type that converts without problems
            trial: List[Tuple[str, str]] = []
            out = _convert(a, value, key, trial)
            if not trial:
                return out
        problems.append((key, f"got {value!r}, expected {type_name(tp)}"))
        return None
    if isinstance(tp, type) and issubclass(tp, Section):
        if not isinstance(value, dict):
            problems.append((key, f"got {value!r}, expected a mapping"))
            return None
        return _build(tp, value, key, problems)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            problems.append((key, f"got {value!r}, expected {type_name(tp)}"))
            return None
        (item,) = typing.get_args(tp)
        return [_convert(item, v, key, problems) for v in value]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            problems.append((key, f"got {value!r}, expected a mapping"))
            return None
        return dict(value)
    if tp is Any:
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    problems.append((key, f"got {value!r} ({type(value).__name__}), expected {type_name(tp)}"))
    return None


def _nullable(tp) -> bool:
    return typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _build(cls, raw: Dict, path: str, problems: List[Tuple[str, str]]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    extras = cls.extra_sections()
    alias_of = {a: f.name for f in fields.values() for a in f.metadata.get("aliases", ())}
    values: Dict[str, Any] = {}
    extra_values: Dict[str, Any] = {}
    given: Dict[str, str] = {}  # field name -> the key the config used for it
    for k, v in raw.items():
        name = k if k in fields or k in extras else alias_of.get(k)
        if name is None and k in cls.notices:
            _notice(cls.notices[k], _join(path, str(k)), v, problems)
            continue
        if name is None:
            known = sorted([*fields, *extras])
            problems.append((_join(path, str(k)), f"unknown key (known keys here: {', '.join(known)})"))
            continue
        if name in given:
            problems.append((_join(path, str(k)), f"given twice: as {given[name]!r} and as {k!r}"))
            continue
        given[name] = str(k)
        key = _join(path, name)
        if name not in fields:
            converter = None
        elif k != name:
            converter = fields[name].metadata.get("converters", {}).get(k)
        else:
            converter = fields[name].metadata.get("convert")
        if converter is not None:
            try:
                v = converter(v)
            except (ValueError, TypeError, KeyError) as e:
                problems.append((_join(path, str(k)), str(e)))
                continue
            if v is _SKIP:
                continue
        if name in extras:
            extra_values[name] = None if v is None else _convert(extras[name], v, key, problems)
        else:
            values[name] = _convert(hints[name], v, key, problems)
    token = _BUILDING.set(True)
    try:
        node = cls(**{k: v for k, v in values.items() if v is not None or _nullable(hints[k])})
    finally:
        _BUILDING.reset(token)
    object.__getattribute__(node, "__dict__")["_extra"] = {k: v for k, v in extra_values.items() if v is not None}
    _set_paths(node, path)
    return node


def _set_paths(node: Section, path: str) -> None:
    object.__setattr__(node, "_path", path)
    for name, value in _children(node):
        key = _join(path, name)
        if isinstance(value, Section):
            _set_paths(value, key)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Section):
                    _set_paths(item, key)


# --------------------------------------------------------------------------- constraints
def _describe_range(meta: dict, value) -> str:
    if meta.get("expected"):
        return meta["expected"]
    kind = "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a number"
    parts = [f"{op} {meta[name]}" for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
             if meta.get(name) is not None]
    if meta.get("multiple_of"):
        parts.append(f"a multiple of {meta['multiple_of']}")
    return f"{kind} " + " and ".join(parts)


def _field_problem(meta: dict, value) -> Optional[str]:
    if value is None:
        return None
    choices = meta.get("choices")
    if choices is not None:
        options = list(choices() if callable(choices) else choices)
        if value not in options:
            return f"got {value!r}, expected " + (meta.get("expected") or "one of " + ", ".join(map(str, options)))
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    bad = ((meta.get("ge") is not None and not value >= meta["ge"]) or
           (meta.get("gt") is not None and not value > meta["gt"]) or
           (meta.get("le") is not None and not value <= meta["le"]) or
           (meta.get("lt") is not None and not value < meta["lt"]) or
           (meta.get("multiple_of") and value % meta["multiple_of"] != 0))
    return f"got {value!r}, expected {_describe_range(meta, value)}" if bad else None


def _check_node(node: Section, problems: List[Tuple[str, str]], skip: Set[str] = frozenset()) -> None:
    """Field constraints and ``rules()`` of ``node`` and everything below it; keys in ``skip`` (already
    reported as mistyped or unknown) are left out of rules that mention them."""
    path = object.__getattribute__(node, "_path")
    for f in dataclasses.fields(node):
        key = _join(path, f.name)
        if key in skip:
            continue
        value = object.__getattribute__(node, f.name)
        message = _field_problem(f.metadata, value) if f.metadata else None
        if message:
            problems.append((key, message))
    for name, value in _children(node):
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, Section):
                _check_node(item, problems, skip)
    for rel, message in node.rules() or ():
        key = _join(path, rel) if rel else path
        if not any(s and (s == key or s in message) for s in skip):
            problems.append((key, message))


_NOTICES: Optional[List[Tuple[str, str]]] = None


def _notice(notice: Notice, key: str, value, problems: List[Tuple[str, str]]) -> None:
    only = notice.only
    if only is not ANY_VALUE and value != only and not (isinstance(only, (list, tuple)) and value in only):
        shown = only if not isinstance(only, tuple) else " or ".join(map(repr, only))
        problems.append((key, f"got {value!r}; only {shown!r} is supported here ({notice.reason})"))
    elif _NOTICES is not None:
        _NOTICES.append((key, notice.reason))


def _moved_from(cls, path: str = "") -> Dict[str, Tuple[str, Optional[Callable], Optional[Callable]]]:
    """Every dotted alias declared in the tree of ``cls``: alias path → (field path, the alias's converter,
    the field's own converter)."""
    out: Dict[str, Tuple[str, Optional[Callable], Optional[Callable]]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        key = _join(path, f.name)
        for alias, conv in (f.metadata.get("moved_from") or {}).items():
            out[alias] = (key, conv, f.metadata.get("convert"))
        for tp in _section_types(hints[f.name]):
            out.update(_moved_from(tp, key))
    for name, tp in cls.extra_sections().items():
        out.update(_moved_from(tp, _join(path, name)))
    return out


def _section_types(tp):
    if isinstance(tp, type) and issubclass(tp, Section):
        return [tp]
    return [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, Section)]


_ABSENT = object()


def _pop(raw: Dict, dotted: str):
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(p), dict):
            return _ABSENT
        node = node[p]
    if not isinstance(node, dict) or parts[-1] not in node:
        return _ABSENT
    value = node.pop(parts[-1])
    # a mapping the alias emptied is gone too, so its parent sees no stray empty key
    return value


def _prune(raw: Dict, dotted: str) -> None:
    parts = dotted.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        node = raw
        for p in parts[:depth - 1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        leaf = parts[depth - 1]
        if isinstance(node, dict) and node.get(leaf) == {}:
            del node[leaf]


def _put(raw: Dict, dotted: str, value) -> Any:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {} if node.get(p) is None else node[p]
        node = node[p]
    previous = node.get(parts[-1], _ABSENT)
    node[parts[-1]] = value
    return previous


def _apply_moved(cls, raw: Dict, path: str, problems: List[Tuple[str, str]]) -> Dict:
    """Move the values of dotted aliases onto their fields (a copy of ``raw``; the original is untouched)."""
    import copy

    raw = copy.deepcopy(raw)
    for alias, (target, conv, own) in sorted(_moved_from(cls, path).items()):
        rel_alias = alias[len(path) + 1:] if path and alias.startswith(path + ".") else alias
        rel_target = target[len(path) + 1:] if path and target.startswith(path + ".") else target
        value = _pop(raw, rel_alias)
        if value is _ABSENT:
            continue
        _prune(raw, rel_alias)
        if conv is not None:
            try:
                value = conv(value)
            except (ValueError, TypeError, KeyError) as e:
                problems.append((alias, str(e)))
                continue
            if value is _SKIP:
                continue
        previous = _put(raw, rel_target, value)
        if previous is not _ABSENT and previous is not None and own is not None:
            try:
                previous = own(previous)  # the field's placeholder (e.g. NeMo's [null]) is no value
            except (ValueError, TypeError, KeyError):
                pass
        if previous is not _ABSENT and previous is not None and previous is not _SKIP and previous != value:
            problems.append((alias, f"got {value!r}, but {target} is {previous!r}: give one of them"))
    return raw


_SKIP = object()  # a converter's "this value sets nothing" (e.g. NeMo-Aligner's placeholder [null])


def skip() -> Any:
    return _SKIP


def validate_tree(cls, raw: Dict, path: str = "", notices: Optional[List[Tuple[str, str]]] = None,
                  ) -> Tuple[Optional[Section], List[Tuple[str, str]]]:
    """Build ``cls`` from ``raw`` and check it; returns (tree, every problem as (key, message)). Keys
    accepted with a notice are appended to ``notices`` as (key, reason).

    The constraints and rules run even when some keys were unknown or mistyped (those fell back to
    their defaults), so one attempt reports every problem; rules that mention a broken key are left out."""
    global _NOTICES
    problems: List[Tuple[str, str]] = []
    if not isinstance(raw, dict):
        return None, [(path or "<root>", f"got {type(raw).__name__}, expected a mapping")]
    raw = _apply_moved(cls, raw, path, problems)
    previous, _NOTICES = _NOTICES, (notices if notices is not None else [])
    try:
        tree = _build(cls, raw, path, problems)
    finally:
        _NOTICES = previous
    broken = {k for k, _ in problems}
    _check_node(tree, problems, broken)
    return tree, problems


def as_dict(node: Section) -> Dict[str, Any]:
    """The plain-dict form of a tree (extra sections included), e.g. for writing it back as YAML."""
    out = {}
    for name, value in _children(node):
        if isinstance(value, Section):
            out[name] = as_dict(value)
        elif isinstance(value, list):
            out[name] = [as_dict(v) if isinstance(v, Section) else v for v in value]
        else:
            out[name] = value
    return out


__all__ = ["MISSING", "Notice", "Section", "setting", "skip", "track_reads", "leaf_keys", "validate_tree", "as_dict", "type_name",
           "Callable"]
