"""Shipped files are found through one lookup, and a site's own maps come first.

Pure: files on disk only (the installed-wheel path is tests/integration/test_wheel.py).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from controller.cli.main import main
from drivers.devicemap import (
    DEFAULT_MAP_DIR,
    DeviceMapError,
    available_maps,
    load_map,
    map_path,
)
from drivers.shipped import ShippedFileError, config_path, shipped_file, shipped_files

REPO = Path(__file__).resolve().parents[2]
ENV = "RACKPOWER_DEVICE_MAPS"


def _own_map(dirpath: Path, name: str, description: str) -> Path:
    """A copy of the shipped APC map under ``name`` with its own description."""
    text = (DEFAULT_MAP_DIR / "apc-rpdu2.yaml").read_text()
    assert "description:" in text
    text = re.sub(r"(?m)^description:.*$", f"description: {description}", text, count=1)
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / f"{name}.yaml"
    path.write_text(text)
    return path


def test_shipped_maps_are_the_repository_configs() -> None:
    # From a checkout the package *is* configs/: one copy of each file, no second tree.
    assert config_path() == REPO / "configs"
    assert DEFAULT_MAP_DIR == REPO / "configs" / "devices"


def test_every_tracked_config_file_is_listed_as_shipped() -> None:
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "configs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    expected = {t.removeprefix("configs/") for t in tracked if not t.endswith(".py")}
    assert expected <= {name for name, _ in shipped_files()}
    assert "sites/demo.yaml" in expected


def test_site_maps_are_searched_before_the_shipped_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _own_map(first, "apc-rpdu2", "site copy, first")
    _own_map(second, "apc-rpdu2", "site copy, second")
    _own_map(second, "acme-only", "only the site has it")
    monkeypatch.setenv(ENV, os.pathsep.join([str(first), str(second)]))
    assert map_path("apc-rpdu2") == first / "apc-rpdu2.yaml"
    assert load_map("apc-rpdu2").description == "site copy, first"
    assert load_map("acme-only").description == "only the site has it"
    names = dict(available_maps())
    assert names["apc-rpdu2"] == first / "apc-rpdu2.yaml"  # shadows the shipped one
    assert names["generic-sst-mv800"] == DEFAULT_MAP_DIR / "generic-sst-mv800.yaml"


def test_a_missing_map_lists_every_place_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "maps").mkdir()
    monkeypatch.setenv(ENV, f"{tmp_path / 'maps'}{os.pathsep}{tmp_path / 'gone'}")
    with pytest.raises(DeviceMapError) as err:
        map_path("acme-x")
    text = str(err.value)
    assert "no device map named 'acme-x'" in text
    assert f"{tmp_path / 'maps'} (RACKPOWER_DEVICE_MAPS)" in text
    assert f"{tmp_path / 'gone'} (RACKPOWER_DEVICE_MAPS, no such directory)" in text
    assert f"{DEFAULT_MAP_DIR} (shipped)" in text


def test_a_missing_map_without_the_variable_says_it_is_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(DeviceMapError, match="RACKPOWER_DEVICE_MAPS is not set"):
        map_path("acme-x")


def test_relative_site_map_dirs_are_named_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _own_map(tmp_path / "maps", "acme-rel", "relative")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV, "maps")
    assert map_path("acme-rel") == tmp_path / "maps" / "acme-rel.yaml"


@pytest.mark.parametrize("bad", ["../pyproject.toml", "/etc/passwd", "", "sites/../../README.md"])
def test_shipped_file_refuses_names_outside_the_package(bad: str) -> None:
    with pytest.raises(ShippedFileError):
        shipped_file(bad)


def test_shipped_command_prints_one_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shipped", "sites/demo.yaml"]) == 0
    out = capsys.readouterr().out.strip()
    assert Path(out) == REPO / "configs" / "sites" / "demo.yaml"
    assert main(["shipped", "sites/nope.yaml"]) == 2
    assert "ships no file 'sites/nope.yaml'" in capsys.readouterr().err


def test_shipped_command_lists_the_maps_and_units(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shipped"]) == 0
    out = capsys.readouterr().out
    for name in (
        "devices/generic-sst-mv800.yaml",
        "scenarios/sync-step.yaml",
        "deploy/rackpower.service",
        "agents/example.yaml",
    ):
        assert name in out


def test_no_module_locates_shipped_files_relative_to_its_source() -> None:
    """drivers/shipped.py is the one lookup: a ``Path(__file__)`` elsewhere in the packages
    would find files in a checkout and miss them in an installed wheel."""
    offenders = [
        str(p.relative_to(REPO))
        for pkg in ("controller", "drivers", "sim")
        for p in (REPO / pkg).rglob("*.py")
        if "__file__" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_a_configs_package_that_is_not_ours_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another distribution's top-level ``configs`` would shadow ours; stand in with ``sim``
    # (a real package without devices/).
    monkeypatch.setattr("drivers.shipped.CONFIG_PACKAGE", "sim")
    with pytest.raises(ShippedFileError, match=r"'sim' .* is not rackpower's"):
        config_path("sites", "demo.yaml")
