"""The tables of the config file and the keys declared in each, for the tests and the docs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import get_args, get_type_hints

from gateway.config._model import Config

__all__ = ["declared_tables"]


def declared_tables(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, type, bool]]:
    """``(dotted name, dataclass, repeated)`` for every table of the file, in file order; a
    repeated table is an array of tables (``[[sources]]``)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        name = f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield name, hint, False
            yield from declared_tables(hint, name)
        elif getattr(hint, "__origin__", None) is tuple and dataclasses.is_dataclass(
            get_args(hint)[0]
        ):
            item = get_args(hint)[0]
            yield name, item, True
            yield from declared_tables(item, name)
