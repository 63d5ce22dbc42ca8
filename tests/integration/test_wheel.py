"""The wheel a facility engineer installs works without the checkout.

One module-scoped rig builds the wheel from this working tree (a copy of the files git
tracks or would track, so the checkout gets no ``build/`` or ``*.egg-info``), installs it
into a fresh venv in a temporary directory with plain ``pip install`` (dependencies come
from the package index through pip's cache), and every test runs the installed
``rackpower`` from a directory outside the checkout with ``PYTHONPATH`` removed, so a
file found through the source tree instead of the package would fail here. Nothing is
faked: the demo is the real one, read back over its own HTTP API.

Timings of the build, the install and the demo are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 300.0  # a cold pip cache downloads every dependency once
DEMO_S = 20


@dataclass(frozen=True)
class Installed:
    venv: Path
    rackpower: Path
    python: Path
    elsewhere: Path  # a working directory outside the checkout
    env: dict[str, str]

    def run(
        self, *args: str, extra_env: dict[str, str] | None = None, timeout_s: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.rackpower), *args],
            cwd=self.elsewhere,
            env={**self.env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )


def _tree_files() -> list[str]:
    """What a clean clone of this working tree would hold (tracked and new, not ignored)."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.pop("RACKPOWER_DEVICE_MAPS", None)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clean tree holds")
    base = tmp_path_factory.mktemp("wheel")
    src, dist, venv, elsewhere = base / "src", base / "dist", base / "venv", base / "site"
    for rel in _tree_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    elsewhere.mkdir()
    env = _clean_env()
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        check=True,
        env=env,
        cwd=base,
        timeout=INSTALL_TIMEOUT_S,
    )
    built_s = time.monotonic() - started
    (wheel,) = dist.glob("rackpower-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        env=env,
        cwd=base,
        timeout=INSTALL_TIMEOUT_S,
    )
    total_s = time.monotonic() - started
    print(f"\nwheel: built in {built_s:.1f} s, built + fresh venv + install in {total_s:.1f} s")
    yield Installed(
        venv=venv,
        rackpower=venv / "bin" / "rackpower",
        python=venv / "bin" / "python",
        elsewhere=elsewhere,
        env=env,
    )


def _site_packages(inst: Installed) -> Path:
    out = subprocess.run(
        [str(inst.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=inst.elsewhere,
        env=inst.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(out)


def test_the_installed_code_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    site = _site_packages(installed)
    out = subprocess.run(
        [
            str(installed.python),
            "-c",
            "import configs, controller, drivers.shipped as s; "
            "print(controller.__file__); print(s.device_maps_dir())",
        ],
        cwd=installed.elsewhere,
        env=installed.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [Path(p).is_relative_to(site) for p in out] == [True, True]
    assert not any(Path(p).is_relative_to(REPO) for p in out)


def test_the_wheel_ships_every_config_file(installed: Installed) -> None:
    shipped = _site_packages(installed) / "configs"
    in_repo = {f.removeprefix("configs/") for f in _tree_files() if f.startswith("configs/")}
    in_wheel = {
        p.relative_to(shipped).as_posix()
        for p in shipped.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert in_repo == in_wheel
    for hook in ("deploy/slurm/prolog_slurmctld.sh", "deploy/slurm/epilog_slurmctld.sh"):
        assert os.access(shipped / hook, os.X_OK), f"{hook} lost its executable bit"


def test_validate_the_shipped_demo_site_from_anywhere(installed: Installed) -> None:
    where = installed.run("shipped", "sites/demo.yaml")
    assert where.returncode == 0, where.stderr
    demo = Path(where.stdout.strip())
    assert demo.is_relative_to(_site_packages(installed))
    res = installed.run("validate", str(demo))
    assert res.returncode == 0, res.stderr
    assert "site 'demo' is valid" in res.stdout
    assert "256 gpus" in res.stdout
    assert re.search(r"devices: [1-9]", res.stdout), res.stdout


def test_a_copied_site_finds_the_shipped_maps(installed: Installed) -> None:
    # The way a host is set up: the example copied to its own place, then edited.
    demo = Path(installed.run("shipped", "sites/demo.yaml").stdout.strip())
    etc = installed.elsewhere / "etc"
    etc.mkdir(exist_ok=True)
    shutil.copy(demo, etc / "site.yaml")
    res = installed.run("validate", str(etc / "site.yaml"))
    assert res.returncode == 0, res.stderr


def test_a_site_map_of_its_own_through_rackpower_device_maps(installed: Installed) -> None:
    shipped = _site_packages(installed) / "configs"
    own = installed.elsewhere / "own-maps"
    own.mkdir(exist_ok=True)
    shutil.copy(shipped / "devices" / "generic-sst-mv800.yaml", own / "acme-sst-9000.yaml")
    site = yaml.safe_load((shipped / "sites" / "demo.yaml").read_text())
    site_text = json.dumps(site)
    assert '"generic-sst-mv800"' in site_text
    mine = installed.elsewhere / "acme.yaml"
    mine.write_text(site_text.replace('"generic-sst-mv800"', '"acme-sst-9000"'))

    refused = installed.run("validate", str(mine))
    assert refused.returncode == 2
    assert "no device map named 'acme-sst-9000'" in refused.stderr
    assert f"{shipped / 'devices'} (shipped)" in refused.stderr
    assert "RACKPOWER_DEVICE_MAPS is not set" in refused.stderr

    ok = installed.run("validate", str(mine), extra_env={"RACKPOWER_DEVICE_MAPS": str(own)})
    assert ok.returncode == 0, ok.stderr
    assert "is valid" in ok.stdout


def test_a_shipped_scenario_finds_its_site(installed: Installed) -> None:
    # Scenarios name their site relative to themselves (../sites/demo.yaml): the package
    # keeps the layout. Loading is enough here; running one is the scenario benchmark's job.
    code = (
        "from drivers.shipped import config_path; from sim.scenario_spec import load_scenario;"
        " s = load_scenario(config_path('scenarios', 'sync-step.yaml')); print(s.site.name)"
    )
    out = subprocess.run(
        [str(installed.python), "-c", code],
        cwd=installed.elsewhere,
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "demo"


def test_demo_runs_from_the_package(installed: Installed) -> None:
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            str(installed.rackpower),
            "demo",
            "--duration",
            str(DEMO_S),
            "--api-port",
            "0",
            "--report-s",
            "2",
        ],
        cwd=installed.elsewhere,
        env=installed.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        url = None
        for line in proc.stdout:
            lines.append(line)
            if m := re.match(r"\s+status page\s+(http://\S+)/$", line):
                url = m.group(1)
                break
        assert url is not None, "".join(lines) + (proc.stderr.read() if proc.stderr else "")
        # Read back over the API: the status page (shipped controller/static) and the tree
        # built from the shipped site and maps.
        with urllib.request.urlopen(f"{url}/", timeout=10) as r:
            page = r.read().decode()
        assert "<html" in page.lower()
        with urllib.request.urlopen(f"{url}/v1/tree", timeout=10) as r:
            tree = json.loads(r.read())
        assert tree  # the demo site's power tree, served
        rest, err = proc.communicate(timeout=DEMO_S + 60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    elapsed_s = time.monotonic() - started
    print(f"\ndemo: exit {proc.returncode} after {elapsed_s:.1f} s")
    assert proc.returncode == 0, out + err
    assert "rackpower demo: site 'demo'" in out
    status = [ln for ln in out.splitlines() if ln.startswith("t=")]
    assert status, out
    assert any(" feed " in ln for ln in status), status  # meters read through shipped maps
    assert "stopped after" in out
    assert " 0 trips" in out
