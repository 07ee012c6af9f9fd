"""Typed field access for plain dicts read from JSON/TOML, with errors that name file and field.

Every reader raises :class:`~edgepeft.errors.SpecError` naming the source file,
the dotted field path and the problem, so a user can fix a profile or manifest
without reading code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..errors import SpecError, UsageError

_MISSING = object()


def check_choice(value: Any, choices: Iterable, what: str, *, hint_flag: str | None = None,
                 error: Callable[..., Exception] = UsageError, hint: str | None = None) -> Any:
    """``value`` when it is one of ``choices``; else raise ``error`` (a typed error class, or a callable taking
    ``(message, hint=...)``) saying "unknown <what> <value>: not one of <choices>". The hint is ``hint``,
    or names ``hint_flag``, the option to pass one of them to. Every "unknown X" check goes through here.
    ``value`` may come from a peer: its shown form is cut to 80 characters."""
    choices = tuple(choices)
    if any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):  # True is not 1
        return value
    listed = ", ".join(str(c) for c in choices)
    hint = hint or (f"pass one of them to {hint_flag}" if hint_flag else "check the spelling")
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise error(f"unknown {what} {shown}: not one of {listed}", hint=hint)


class Fields:
    """A view of one table of a spec file: ``Fields(data, source, prefix)``."""

    def __init__(self, data: Any, source: str, prefix: str = ""):
        if not isinstance(data, dict):
            raise SpecError(source, prefix or "(top level)", f"expected a table, got {type(data).__name__}")
        self.data, self.source, self.prefix = data, source, prefix
        self._seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, problem: str, hint: str | None = None) -> SpecError:
        return SpecError(self.source, self.path(key), problem, hint=hint)

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.error(key, "is required but missing")
            return default
        return value

    def str(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] | None = None) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        if choices:
            check_choice(value, choices, key, error=lambda message, hint: self.error(key, message, hint))
        return value

    def int(self, key: str, default: Any = _MISSING, *, min: int | None = None, max: int | None = None) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if min is not None and value < min:
            raise self.error(key, f"must be at least {min}, got {value}")
        if max is not None and value > max:
            raise self.error(key, f"must be at most {max}, got {value}")
        return value

    def float(self, key: str, default: Any = _MISSING, *, min: float | None = None, max: float | None = None) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {value!r}")
        if (min is not None and value < min) or (max is not None and value > max):
            raise self.error(key, f"must be between {min} and {max}, got {value}")
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def str_list(self, key: str, default: Any = _MISSING, *, nonempty: bool = False) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        if nonempty and not value:
            raise self.error(key, "must not be empty")
        return list(value)

    def items(self, key: str, default: Any = _MISSING) -> list:
        """A list (of tables or values) to parse item by item; None and absent give ``default``."""
        value = self._get(key, default)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {type(value).__name__}")
        return value

    def table(self, key: str, default: Any = _MISSING) -> Fields:
        value = self._get(key, default)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {value!r}")
        return Fields(value, self.source, self.path(key))

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default)

    def reject_unknown(self) -> None:
        """Refuse keys nobody read: a typo in a profile must not pass silently."""
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "is not a known field", hint="check the spelling against targets/README.md")
