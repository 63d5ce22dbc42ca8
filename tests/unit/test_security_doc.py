"""docs/security.md names a test for every defence: each one it names must exist.

The page is the threat model an operator reads; a test renamed or removed would leave
it claiming a defence nothing checks any more.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
# `tests/x/test_y.py`, `tests/x/test_y.py::test_name`, `::test_name` (same file as before),
# `test_f7_*` (a prefix).
REF = re.compile(r"`(?P<file>tests/[\w/]+\.py)?(?:::(?P<name>[\w*]+))?`")


def references() -> list[tuple[str, str | None]]:
    refs: list[tuple[str, str | None]] = []
    last_file: str | None = None
    for m in REF.finditer(DOC.read_text()):
        file, name = m.group("file"), m.group("name")
        if file is None and name is None:
            continue
        file = file or last_file
        assert file is not None, f"{m.group(0)} names a test before any file"
        last_file = file
        refs.append((file, name))
    return refs


def test_the_doc_names_tests() -> None:
    assert len(references()) > 40


def test_every_test_the_doc_names_exists() -> None:
    missing = []
    for file, name in references():
        path = ROOT / file
        if not path.is_file():
            missing.append(file)
            continue
        if name is None:
            continue
        text = path.read_text()
        pattern = re.escape(name).replace(r"\*", r"\w*")
        if not re.search(rf"^(?:async )?def {pattern}\(", text, re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"
