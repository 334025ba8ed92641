"""The tables of the config file, and the reference (docs/configuration.md) made from them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any, get_args, get_type_hints

from gateway.config._model import Config
from gateway.config._schema import Key, declared_keys

__all__ = ["declared_tables", "reference_markdown"]

_TYPE_NAMES: dict[Any, str] = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    tuple[str, ...]: "list of strings",
    Mapping[str, str]: "table of strings",
}


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


def reference_markdown() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the declarations in gateway/config/_model.py by",
        "     `python -m gateway.config > docs/configuration.md`; tests/test_config.py checks",
        "     that it is current. Do not edit by hand. -->",
        "",
        "Every key of the TOML file, with its type, default and the values it accepts. An",
        "unknown key is refused, and every error names the key. Secrets are never in the file:",
        "keys ending in `_env` name the environment variable that holds one.",
        "[`config/gateway.example.toml`](../config/gateway.example.toml) uses every key, with",
        "longer comments: each `[table]` at these defaults, each `[[array]]` entry as an example.",
    ]
    for name, cls, repeated in declared_tables():
        heading = f"[[{name}]]" if repeated else f"[{name}]"
        out += ["", f"## `{heading}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [" ".join(cls.__doc__.split()), ""]
        out += ["| key | type | default | accepts | meaning |", "|---|---|---|---|---|"]
        out += [_row(k) for k in declared_keys(cls)]
    return "\n".join(out) + "\n"


def _row(k: Key) -> str:
    default = "required" if k.required else f"`{_toml(k.default)}`"
    if k.setting.default_note:
        default += f" ({k.setting.default_note})"
    accepts = []
    if k.setting.choices:
        accepts.append(", ".join(f"`{_toml(c)}`" for c in k.setting.choices))
    if k.setting.minimum is not None:
        accepts.append(f">= {k.setting.minimum}")
    cells = [f"`{k.name}`", _TYPE_NAMES[k.type], default, "; ".join(accepts), k.setting.doc]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)
