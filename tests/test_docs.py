"""The docs name what is there: every test file has its row in docs/testing.md's layer table."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layer_table() -> str:
    text = (ROOT / "docs" / "testing.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def test_every_test_file_is_in_the_layer_table_and_every_named_file_exists() -> None:
    table = _layer_table()
    named = set(re.findall(r"`(test_\w+\.py)`", table))
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert files - named == set(), "test files without a row in docs/testing.md's layer table"
    assert named - files == set(), "docs/testing.md's layer table names files that do not exist"
