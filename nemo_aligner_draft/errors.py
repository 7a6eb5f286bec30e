"""Bad input as a typed exception that carries what caused it.

Code that finds a problem with what the user gave raises :class:`InputError` with the *key* that
chose the bad thing — a config key (``model.peft.lora_tuning.target_modules``), a command-line flag
(``--lora``) or a ``file:line`` — and a message saying what was expected. The command-line entry points
print ``str(error)`` as one line and exit with :data:`EXIT_BAD_INPUT`; no traceback, because the user
has nothing to debug. Anything that is not an :class:`InputError` is a bug and keeps its traceback.

Layers below the shell (``core/``, backends, rewards, loaders) raise plain exceptions and know no key
names; the shell wraps each step that acts on one part of the input in :func:`attributed`, which turns
whatever escapes into an :class:`InputError` of that part's key.
"""
from __future__ import annotations

import contextlib
import errno
from typing import Iterator, List, Optional, Sequence, Tuple

EXIT_BAD_INPUT = 2

# Exceptions whose message is written for a user by the code that raised it (ours, or a library's
# plain check such as peft's "Target modules ... not found"). Others (a JSON decoder, a safetensors
# header parser) get their type name and the path prefixed, so the line still says what failed where.
_PLAIN = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
          IsADirectoryError, PermissionError)


class InputError(Exception):
    """One problem with the input: ``key`` caused it, ``message`` says what was expected."""

    def __init__(self, key: str, message: str):
        self.key = str(key)
        self.message = str(message)
        super().__init__(self.key, self.message)

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(InputError):
    """Several problems found at once (config validation reports every one); ``problems`` lists them."""

    def __init__(self, problems: Sequence[InputError | str]):
        self.problems: List[InputError] = [p if isinstance(p, InputError) else _from_line(p) for p in problems]
        first = self.problems[0] if self.problems else InputError("", "invalid configuration")
        super().__init__(first.key, first.message)

    def __str__(self) -> str:
        return "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)


def found(*checks: Tuple[Sequence, str]) -> str:
    """The descriptions of the checks that found something, joined by ``"; "`` (empty when none did):
    each check is ``(what it found, how to say it)``."""
    return "; ".join(text for items, text in checks if len(items))


def some(items: Sequence, what: str, limit: int = 10) -> str:
    """``"N what, e.g. [the first ones]"``."""
    return f"{len(items)} {what}, e.g. {list(items)[:limit]}"


def _from_line(line: str) -> InputError:
    key, sep, message = str(line).partition(": ")
    return InputError(key, message) if sep and " " not in key else InputError("", str(line))


def describe(error: BaseException, what: Optional[str] = None, path: Optional[str] = None) -> str:
    """A one-line message for ``error`` raised while loading ``what`` from ``path``."""
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if type(error) in _PLAIN:  # its first line is the raiser's own sentence; more is a library's dump
        return (lines[0] if lines else type(error).__name__)[:500]
    detail = (lines[-1] if lines else "")[:300]
    if what:
        where = f" from {path!r}" if path else ""
        return f"cannot load {what}{where}: {type(error).__name__}: {detail}"
    return f"{type(error).__name__}: {detail}"


@contextlib.contextmanager
def attributed(key: str, what: Optional[str] = None, path: Optional[str] = None) -> Iterator[None]:
    """Blame ``key`` for any exception raised inside (an :class:`InputError` passes through as it is).

    ``what``/``path`` name the thing being loaded, for errors whose own message does not
    (``cannot load a diffusers pipeline from '/m': JSONDecodeError: ...``)."""
    try:
        yield
    except InputError:
        raise
    except (KeyboardInterrupt, SystemExit, MemoryError, RecursionError):
        raise
    except OSError as e:
        if _environment_failure(e):
            raise
        raise InputError(key, _without_key(describe(e, what, path), key)) from e
    except Exception as e:
        raise InputError(key, _without_key(describe(e, what, path), key)) from e


def report(error: InputError, prog: str = "") -> int:
    """Print ``error`` the way every entry point does (``[prog: ]error: key: message`` on stderr, with the
    traceback behind it when ``NAD_TRACEBACK=1``); returns :data:`EXIT_BAD_INPUT`."""
    import os
    import sys
    import traceback

    if os.environ.get("NAD_TRACEBACK") == "1":
        traceback.print_exception(error)
    print(f"{prog + ': ' if prog else ''}error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _without_key(message: str, key: str) -> str:
    prefix = f"{key}: "
    while message.startswith(prefix):  # a message that already names the key
        message = message[len(prefix):]
    return message


def _environment_failure(e: OSError) -> bool:
    """A full disk or an I/O error is the machine's problem, not the input's: it keeps its traceback."""
    return type(e) is OSError and (e.errno is None or e.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT))
