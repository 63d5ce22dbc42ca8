"""The pages a new engineer reads first name only files and modules that exist.

docs/architecture.md is the reference for the design and CONTRIBUTING.md tells people
which files to touch; a path that a move or a rename left behind sends the next engineer
to a file that is not there, and nothing else would notice. So every repository path
(``controller/...``, ``drivers/...``, ``sim/...``, and ``tests/``, ``configs/``, ``docs/``,
``benchmarks/``), every dotted module name (``drivers.modbus``, ``controller.cli.main``)
and every relative link in them must resolve. Placeholders in recipes
(``drivers/<proto>.py``) are templates, not paths, and are skipped; a glob
(``configs/devices/*.yaml``) must match at least one file. Pure: it reads files only.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("docs/architecture.md", "CONTRIBUTING.md", "README.md")
ROOTS = ("controller", "drivers", "sim", "tests", "configs", "docs", "benchmarks")
PACKAGES = ("controller", "drivers", "sim")

# A path starts at a word boundary that is not part of a longer path (``../shared/x`` and
# ``/etc/rackpower/devices`` are not ours), and runs over path characters.
_PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(ROOTS) + r")/[\w./*<>{}-]*)")
_MODULE = re.compile(r"(?<![\w./-])((?:" + "|".join(PACKAGES) + r")(?:\.\w+)+)(?![\w/])")
_FILE_SUFFIXES = frozenset({"py", "md", "yaml", "yml", "json", "toml", "csv", "txt"})
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _paths(text: str) -> list[str]:
    out = []
    for m in _PATH.finditer(text):
        path = m.group(1).rstrip(".,")
        if "<" in path or "{" in path:
            continue  # a template in a recipe: drivers/<proto>.py
        out.append(path)
    return out


def _path_exists(path: str) -> bool:
    if "*" in path:
        return any(ROOT.glob(path.rstrip("/")))
    return (ROOT / path).exists()


@cache
def _top_level_names(module_file: Path) -> frozenset[str]:
    """Names a module defines or imports at its top level (what ``mod.NAME`` can mean)."""
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_resolves(dotted: str) -> bool:
    """``a.b.c`` is a module, or ``a.b`` is one and defines ``c`` (a class, a function)."""
    if _module_file(dotted) is not None:
        return True
    parent, _, attr = dotted.rpartition(".")
    found = _module_file(parent)
    return found is not None and attr in _top_level_names(found)


def _problems(page: str, text: str) -> list[str]:
    problems = [f"{page}: no file {p}" for p in _paths(text) if not _path_exists(p)]
    problems += [
        f"{page}: no module {m}"
        for m in _MODULE.findall(text)
        if m.rpartition(".")[2] not in _FILE_SUFFIXES and not _module_resolves(m)
    ]
    base = (ROOT / page).parent
    for target in _LINK.findall(text):
        if "://" in target or target.startswith("#"):
            continue
        local = target.split("#", 1)[0]
        if not (base / local).exists():
            problems.append(f"{page}: broken link {target}")
    return problems


@pytest.mark.parametrize("page", PAGES)
def test_every_path_module_and_link_named_exists(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    assert _problems(page, text) == []


def test_the_architecture_page_names_every_layer_and_many_modules() -> None:
    """The check above passes vacuously if the pattern finds nothing: make sure it finds
    the modules, and that the page still covers every folder of ``controller/``."""
    text = (ROOT / "docs/architecture.md").read_text(encoding="utf-8")
    named = set(_paths(text))
    assert len(named) >= 60
    layers = {p.name for p in (ROOT / "controller").iterdir() if (p / "__init__.py").is_file()}
    missing = sorted(f"controller/{name}/" for name in layers if f"controller/{name}/" not in named)
    assert missing == []


def test_a_stale_path_a_stale_module_and_a_broken_link_are_each_reported() -> None:
    text = (
        "See `controller/daemon.py` and `drivers.base.NoSuchThing`, [x](nowhere.md);"
        " `drivers/<proto>.py` is a template, `../shared/ARCHITECTURE.md` is not ours,"
        " `drivers/registry.py`, `drivers.registry.DRIVER_TYPES` and `configs/devices/*.yaml`"
        " are fine."
    )
    assert _problems("docs/architecture.md", text) == [
        "docs/architecture.md: no file controller/daemon.py",
        "docs/architecture.md: no module drivers.base.NoSuchThing",
        "docs/architecture.md: broken link nowhere.md",
    ]
