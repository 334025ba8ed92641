"""How a key of the config file is declared, and the one reader that reads every declared key.

A key is declared on the dataclass field it fills: the field's name is the key, its type and
default are the field's, and a :class:`Setting` in its ``Annotated`` type adds the bounds and
a one-line doc. The reader, the example file's test and the docs table all read these
declarations, so they cannot disagree about a key.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args, get_type_hints

__all__ = ["ConfigError", "Key", "Setting", "Table", "declared_keys", "read_key", "read_keys"]

# (dotted key, value) -> the value to keep (it may normalize, e.g. lowercase); raises ConfigError
Check = Callable[[str, Any], Any]


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns in the message."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


@dataclass(frozen=True)
class Setting:
    """The part of a key's declaration a type annotation cannot say: ``Annotated[int,
    Setting("doc", minimum=1)] = 5`` declares an integer key of at least 1, 5 by default.

    ``when_absent`` is what an absent key reads as, for a field the dataclass requires; without
    it an absent key reads as the empty value of its type, which ``check`` then refuses.
    ``default_note`` says how the default depends on another key, for the docs table.
    """

    doc: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    check: Check | None = None
    default_note: str = ""
    when_absent: Any = None  # TOML has no null: None means none


@dataclass(frozen=True)
class Key:
    """One declared key: its field's name, type and default, and its :class:`Setting`."""

    name: str
    type: Any
    default: Any  # dataclasses.MISSING: the key is required
    setting: Setting

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


@functools.cache
def declared_keys(cls: type) -> tuple[Key, ...]:
    """The keys declared on a config dataclass, in field order."""
    hints = get_type_hints(cls, include_extras=True)
    keys = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        declared = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Setting)]
        if not declared:
            continue  # not a key of the file: derived from keys, or a table of tables
        value_type = get_args(hint)[0]
        if value_type not in _READERS:
            raise TypeError(f"{cls.__name__}.{f.name}: no reader for {value_type}")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        elif declared[0].when_absent is not None:
            default = declared[0].when_absent
        else:
            default = dataclasses.MISSING
        keys.append(Key(f.name, value_type, default, declared[0]))
    return tuple(keys)


def read_keys(cls: type, table: Table, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The declared keys of ``cls`` read from ``table``, checked, as constructor arguments.
    ``defaults`` replaces declared defaults that depend on another key."""
    defaults = defaults or {}
    return {k.name: table.read(k, defaults.get(k.name, k.default)) for k in declared_keys(cls)}


def read_key(cls: type, table: Table, name: str) -> Any:
    """One declared key, for a table whose other defaults depend on it."""
    k = next(k for k in declared_keys(cls) if k.name == name)
    return table.read(k, k.default)


class Table:
    """One TOML table, with its dotted name for error messages and the keys read from it."""

    def __init__(self, data: Any, name: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(name, f"must be a table, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.name = name
        self.used: set[str] = set()

    def dotted(self, name: str) -> str:
        return f"{self.name}.{name}" if self.name else name

    def _get(self, name: str, default: Any) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def read(self, k: Key, default: Any) -> Any:
        if default is dataclasses.MISSING:
            default = _EMPTY[k.type]
        dotted = self.dotted(k.name)
        value = _READERS[k.type](dotted, self._get(k.name, default))
        rules = k.setting
        if rules.choices and value not in rules.choices:
            raise ConfigError(dotted, f"must be one of {', '.join(rules.choices)}, got {value!r}")
        if rules.minimum is not None and value < rules.minimum:
            raise ConfigError(dotted, f"must be at least {rules.minimum}, got {value}")
        if k.type is float:
            value = float(value)
        return rules.check(dotted, value) if rules.check else value

    def table(self, name: str) -> Table:
        return Table(self._get(name, {}), self.dotted(name))

    def tables(self, name: str) -> list[Table]:
        value = self._get(name, [])
        if not isinstance(value, list):
            raise ConfigError(self.dotted(name), "must be an array of tables ([[...]])")
        return [Table(item, f"{self.dotted(name)}[{i}]") for i, item in enumerate(value)]

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(self.dotted(unknown[0]), "unknown key (check the spelling)")


def _text(dotted: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(dotted, f"must be a string, got {value!r}")
    return value


def _flag(dotted: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(dotted, f"must be true or false, got {value!r}")
    return value


def _integer(dotted: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(dotted, f"must be an integer, got {value!r}")
    return value


def _number(dotted: str, value: Any) -> float:
    # the bound is checked on the value as written, so the message shows it as written
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(dotted, f"must be a number, got {value!r}")
    return value


def _texts(dotted: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, tuple):  # a declared default
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(dotted, f"must be a list of strings, got {value!r}")
    return tuple(value)


def _text_map(dotted: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(dotted, "must be a table of strings")
    for k, v in value.items():
        if not isinstance(v, str):
            raise ConfigError(f"{dotted}.{k}", f"must be a string, got {v!r}")
    return dict(value)


_READERS: dict[Any, Callable[[str, Any], Any]] = {
    str: _text,
    bool: _flag,
    int: _integer,
    float: _number,
    tuple[str, ...]: _texts,
    Mapping[str, str]: _text_map,
}
_EMPTY: dict[Any, Any] = {str: "", tuple[str, ...]: (), Mapping[str, str]: {}}
