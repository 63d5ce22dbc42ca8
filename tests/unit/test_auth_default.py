"""Authentication on by default over MQTT: `validate`, `run` and `agent` refuse to go
unsigned unless the config says so in writing (``allow_unsigned: true``).

A site whose node agents talk over MQTT without ``integrations.agent_auth`` is an error
at `validate` (exit 2, file and path), so a facility engineer learns it at their desk and
not from `run` at 3 a.m.; `run` loads the site through the same rules. An agent without
``auth.key_file`` exits 2 naming the setting. The in-process link (no
``integrations.mqtt``: demo, scenarios, simulator) is not concerned. Each refusal was
seen passing silently (exit 0 / 1 / hanging run) on main before this change.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.agent.agent_config import auth_problem, parse_agent_config
from controller.agentlink.msgauth import KeyFileError, KeyStore
from controller.cli.agent_cmd import cmd_agent
from controller.cli.main import main
from controller.model.config import ConfigError
from controller.model.loader import parse_site
from tests.sites import agent_site, tiny_site

REPO = Path(__file__).resolve().parents[2]
MQTT = {"url": "mqtt://127.0.0.1:1"}  # never connected to: every case here stops before


def write(tmp_path: Path, data: dict[str, Any], name: str = "site.yaml") -> Path:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(data))
    return f


def with_auth(auth: dict[str, Any] | None, mqtt: dict[str, Any] | None = MQTT) -> dict[str, Any]:
    site = agent_site(mqtt)
    site.setdefault("integrations", {}).pop("agent_auth", None)
    if auth is not None:
        site["integrations"]["agent_auth"] = auth
    return site


# --- validate ------------------------------------------------------------------------------


def test_validate_refuses_agents_on_mqtt_without_agent_auth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path, with_auth(None))
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}: integrations.agent_auth: 4 node agents (agent-rack-1-n1, ...)" in err
    assert "integrations.agent_auth.keys_dir" in err and "allow_unsigned: true" in err


@pytest.mark.parametrize(
    ("site", "code"),
    [
        (with_auth({"keys_dir": "/etc/rackpower/agent-keys"}), 0),
        (with_auth({"allow_unsigned": True}), 0),
        (with_auth(None, mqtt=None), 0),  # in-process: no broker, nothing to sign
        ({**tiny_site(), "integrations": {"mqtt": MQTT}}, 0),  # BMS only, no agents
        (with_auth({}), 2),
        (with_auth({"allow_unsigned": False}), 2),
        (with_auth({"keys_dir": "/k", "allow_unsigned": True}), 2),
    ],
    ids=["keys-dir", "allow-unsigned", "no-mqtt", "no-agents", "empty", "false", "both"],
)
def test_validate_agent_auth_table(tmp_path: Path, site: dict[str, Any], code: int) -> None:
    f = write(tmp_path, site)
    assert main(["validate", str(f)]) == code
    if code:
        with pytest.raises(ConfigError, match=r"integrations\.agent_auth"):
            parse_site(site, str(f))


def test_shipped_site_configs_validate() -> None:
    for f in sorted((REPO / "configs/sites").glob("*.yaml")):
        assert main(["validate", str(f)]) == 0, f


# --- run -----------------------------------------------------------------------------------


def run_process(config: Path) -> subprocess.CompletedProcess[str]:
    """`rackpower run` as a process: a check that failed to refuse would hang, not pass."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from controller.cli.main import main; sys.exit(main())",
         "run", "--config", str(config), "--no-api", "--log-level", "error"],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
    )  # fmt: skip


def test_run_refuses_agents_on_mqtt_without_agent_auth(tmp_path: Path) -> None:
    f = write(tmp_path, with_auth(None))
    p = run_process(f)
    assert p.returncode == 2, p.stderr
    assert f"{f}: integrations.agent_auth:" in p.stderr


def _missing(d: Path) -> None:
    pass


def _a_file(d: Path) -> None:
    d.write_text("k1 00\n")


def _mode(mode: int):  # type: ignore[no-untyped-def]
    def make(d: Path) -> None:
        d.mkdir()
        os.chmod(d, mode)

    return make


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_missing, "cannot be read: No such file or directory"),
        (_a_file, "is not a directory"),
        (_mode(0o750), "mode 0750 lets others list or change"),
        (_mode(0o755), "mode 0755 lets others list or change"),
        (_mode(0o703), "mode 0703 lets others list or change"),
    ],
    ids=["missing", "a-file", "group-readable", "world-readable", "world-writable"],
)
def test_run_exits_2_on_a_bad_keys_dir(tmp_path: Path, make: Any, words: str) -> None:
    keys = tmp_path / "agent-keys"
    make(keys)
    f = write(tmp_path, with_auth({"keys_dir": str(keys)}))
    p = run_process(f)
    assert p.returncode == 2, p.stderr
    assert f"rackpower run: {keys}: " in p.stderr and words in p.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a directory whatever its mode")
def test_run_exits_2_on_an_unreadable_keys_dir(tmp_path: Path) -> None:
    keys = tmp_path / "agent-keys"
    keys.mkdir(mode=0o700)
    os.chmod(keys, 0o300)  # owner only, but no read: the lazy reads would all fail
    f = write(tmp_path, with_auth({"keys_dir": str(keys)}))
    p = run_process(f)
    assert p.returncode == 2, p.stderr
    assert "cannot be read by this user" in p.stderr


def test_a_private_keys_dir_is_taken(tmp_path: Path) -> None:
    """Positive control for the refusals above: 0700 (and 0500) pass the check."""
    for mode in (0o700, 0o500):
        d = tmp_path / f"k{mode:o}"
        d.mkdir()
        os.chmod(d, mode)
        assert KeyStore(d).keys("agent-x") is None  # taken; the agent has no file yet
    with pytest.raises(KeyFileError):
        KeyStore(tmp_path / "nope")


# --- agent ---------------------------------------------------------------------------------


def agent_yaml(tmp_path: Path, auth: dict[str, Any] | None) -> Path:
    data: dict[str, Any] = {
        "site": "tiny", "agent_id": "agent-rack-1-n1", "node_id": "rack-1-n1",
        "controller_id": "rackpower-tiny", "failsafe_w": 300, "mqtt": MQTT,
    }  # fmt: skip
    if auth is not None:
        data["auth"] = auth
    return write(tmp_path, data, "agent.yaml")


def agent_exit(f: Path) -> int:
    import argparse

    return cmd_agent(argparse.Namespace(config=str(f), log_level="error"))


def test_agent_without_key_file_exits_2_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = agent_yaml(tmp_path, None)
    assert agent_exit(f) == 2  # on main: 1, it went on to open NVML, unsigned
    err = capsys.readouterr().err
    assert f"{f}: auth: no auth.key_file" in err and "auth: {allow_unsigned: true}" in err


@pytest.mark.parametrize(
    ("auth", "path"),
    [
        ({}, "auth"),
        ({"allow_unsigned": False}, "auth"),
        ({"key_file": "/k", "allow_unsigned": True}, "auth"),
    ],
    ids=["empty", "false", "both"],
)
def test_agent_auth_must_say_one_thing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], auth: dict[str, Any], path: str
) -> None:
    f = agent_yaml(tmp_path, auth)
    assert agent_exit(f) == 2
    assert f"{f}: {path}: " in capsys.readouterr().err


def test_agent_allow_unsigned_goes_on_to_nvml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The explicit lab mode passes the check; this machine has no NVML, hence 1."""
    f = agent_yaml(tmp_path, {"allow_unsigned": True})
    assert agent_exit(f) == 1
    assert "NVML is not available" in capsys.readouterr().err


def test_in_process_agent_configs_need_no_auth() -> None:
    """The model stays permissive: the in-process link (demo, simulator) does not sign."""
    cfg = parse_agent_config(
        {"site": "s", "agent_id": "a", "node_id": "n", "controller_id": "c",
         "failsafe_w": 300, "mqtt": MQTT},
        "x",
    )  # fmt: skip
    assert cfg.auth is None and auth_problem(cfg) is not None
