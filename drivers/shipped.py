"""The one lookup for files rackpower ships with its code.

Device maps, example sites, scenarios and the agent and deploy examples live in the
``configs`` package (the repository's ``configs/`` folder, shipped as package data); the
simulator's vendored trace lives in ``sim/data``. Every module that opens one of them
asks here, so a wheel installed on a controller host finds the same files as a git
checkout, and nothing depends on where the source tree was.

Paths are real :class:`~pathlib.Path` objects because the files are used as files: a
scenario names its site relative to itself, ``available_maps`` lists a directory, and an
operator copies a unit file out. A package imported from a zip archive has no such paths,
so that is refused with a sentence instead of failing later.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIG_PACKAGE = "configs"


class ShippedFileError(LookupError):
    """A shipped file that is not where the package says, or a package that is zipped."""


def package_path(package: str, *parts: str) -> Path:
    """``parts`` inside ``package`` on disk (it may not exist: callers check what they need)."""
    root = resources.files(package)
    if not isinstance(root, Path):
        raise ShippedFileError(
            f"package {package!r} is not installed as files on disk ({root!r}); install"
            " rackpower from its wheel with pip or pipx, not as a zip archive"
        )
    return root.joinpath(*parts)


def config_path(*parts: str) -> Path:
    """A path inside the shipped ``configs`` package, e.g. ``config_path("sites", "demo.yaml")``.

    ``configs`` is a plain top-level name, so another distribution in the same venv could
    shadow it; a package without ``devices/`` is not ours, and saying so beats "no device
    map named ..." for every device of the site (pipx gives rackpower a venv of its own)."""
    root = package_path(CONFIG_PACKAGE)
    if not (root / "devices").is_dir():
        raise ShippedFileError(
            f"the package {CONFIG_PACKAGE!r} at {root} is not rackpower's (it has no devices/);"
            " another installed distribution shadows it: install rackpower in a venv of its own"
        )
    return root.joinpath(*parts)


def device_maps_dir() -> Path:
    """The shipped device maps, searched after the directories in ``RACKPOWER_DEVICE_MAPS``."""
    return config_path("devices")


def shipped_file(relative: str) -> Path:
    """An existing shipped file named relative to ``configs`` (``sites/demo.yaml``)."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ShippedFileError(f"not a shipped file name: {relative!r} (e.g. sites/demo.yaml)")
    path = config_path(*rel.parts)
    if not path.is_file():
        raise ShippedFileError(
            f"rackpower ships no file {relative!r} (in {config_path()});"
            " `rackpower shipped` lists them"
        )
    return path


def shipped_files() -> list[tuple[str, Path]]:
    """(name relative to ``configs``, path) of every shipped data file, sorted by name."""
    root = config_path()
    return sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    )
