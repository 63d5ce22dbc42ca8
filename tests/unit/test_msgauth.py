"""Sealing and opening agent-link messages, key files and their rotation.

Code: controller.agentlink.msgauth.

Pure functions and real files in tmp_path; nothing to fake. The agent-side refusals over
a real broker are in tests/integration/test_f2_lease_auth.py.
"""

from __future__ import annotations

import argparse
import os
import timeit
from pathlib import Path

import pytest

from controller.agentlink.lease import Lease, decode_lease
from controller.agentlink.msgauth import (
    AuthError,
    Key,
    KeyFile,
    KeyFileError,
    KeyStore,
    new_key_line,
    open_sealed,
    parse_keys,
    seal,
    write_key_file,
)
from controller.cli.agent_cmd import cmd_agent

REPO = Path(__file__).resolve().parents[2]
A, B = "agent-a", "agent-b"
K1 = Key("k1", bytes(range(32)))
K2 = Key("k2", bytes(range(1, 33)))


def payload() -> bytes:
    return Lease.issue(
        "ctl", 1_700_000_000_000, {0: 500.0}, 10, agent_id=A, issued_at=1_700_000_000.0
    ).encode()


def test_sealed_lease_opens_to_exactly_the_bytes_sealed() -> None:
    wire = seal("lease", A, payload(), K1)
    assert open_sealed("lease", A, wire, [K1]) == payload()
    assert decode_lease(open_sealed("lease", A, wire, [K1])).caps_w == {"0": 500.0}


@pytest.mark.parametrize(
    ("what", "wire", "kind", "agent", "keys", "words"),
    [
        ("unsigned", payload(), "lease", A, [K1], "unsigned"),
        (
            "wrong key",
            seal("lease", A, payload(), Key("k1", b"x" * 32)),
            "lease",
            A,
            [K1],
            "bad signature",
        ),
        ("for another agent", seal("lease", A, payload(), K1), "lease", B, [K1], "bad signature"),
        (
            "telemetry as lease",
            seal("telemetry", A, payload(), K1),
            "lease",
            A,
            [K1],
            "bad signature",
        ),
        ("unknown kid", seal("lease", A, payload(), K2), "lease", A, [K1], "unknown key id"),
        ("not json", b"\xff\x00garbage", "lease", A, [K1], "unsigned"),
        ("extra field", b'{"kid":"k1","sig":"x","m":"{}","x":1}', "lease", A, [K1], "unsigned"),
        ("huge", b'{"kid":"k1"' + b" " * 300_000 + b"}", "lease", A, [K1], "bytes"),
    ],
)
def test_what_fails_authentication_is_refused_with_the_reason(
    what: str, wire: bytes, kind: str, agent: str, keys: list[Key], words: str
) -> None:
    with pytest.raises(AuthError, match=words):
        open_sealed(kind, agent, wire, keys)  # type: ignore[arg-type]


def test_an_altered_payload_fails() -> None:
    wire = seal("lease", A, payload(), K1).replace(b"500.0", b"700.0")
    with pytest.raises(AuthError, match="bad signature"):
        open_sealed("lease", A, wire, [K1])


def test_two_keys_open_during_a_rollover_and_the_first_seals(tmp_path: Path) -> None:
    path = tmp_path / "a.key"
    write_key_file(path, new_key_line("new"), new_key_line("old"))
    keys = KeyFile(path).current()
    assert [k.kid for k in keys] == ["new", "old"]
    for k in keys:
        assert open_sealed("lease", A, seal("lease", A, payload(), k), keys) == payload()


def test_key_file_is_re_read_when_it_changes_and_on_reload(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "a.key"
    write_key_file(path, new_key_line("k1"))
    kf = KeyFile(path, check_every_s=1.0, clock=lambda: now[0])
    old = kf.current()[0]
    write_key_file(path, new_key_line("k2"), f"k1 {old.secret.hex()}")
    assert [k.kid for k in kf.current()] == ["k1"]  # not looked at before check_every_s
    now[0] = 1.5
    assert [k.kid for k in kf.current()] == ["k2", "k1"]  # mtime/size changed: re-read
    write_key_file(path, new_key_line("k3"))
    kf.reload()  # SIGHUP: at once
    assert [k.kid for k in kf.current()] == ["k3"]


def test_a_key_file_that_turns_bad_keeps_the_keys_loaded(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "a.key"
    write_key_file(path, new_key_line("k1"))
    kf = KeyFile(path, clock=lambda: now[0])
    write_key_file(path, "garbage")
    now[0] = 5
    assert [k.kid for k in kf.current()] == ["k1"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "a.key"
    write_key_file(path, new_key_line())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="readable only by its owner"):
        KeyFile(path)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "no key"),
        ("k1 abcd", "at least 32 needed"),
        ("k1 zz" + "0" * 64, "not hex"),
        ("k1", "expected"),
        (f"{new_key_line('a')}\n{new_key_line('b')}\n{new_key_line('c')}", "at most 2"),
        (f"{new_key_line('a')}\n{new_key_line('a')}", "twice"),
        ("bad/kid " + "00" * 32, "key id"),
    ],
)
def test_bad_key_files_are_refused_with_the_reason(text: str, words: str) -> None:
    with pytest.raises(KeyFileError, match=words):
        parse_keys(text, "a.key")


def test_key_store_finds_each_agent_by_file_and_reports_the_missing(tmp_path: Path) -> None:
    now = [0.0]
    write_key_file(tmp_path / f"{A}.key", new_key_line("k1"))
    store = KeyStore(tmp_path, clock=lambda: now[0])
    assert store.keys(A) is not None
    assert store.missing([A, B]) == [B]
    assert "cannot read" in (store.problem(B) or "")
    write_key_file(tmp_path / f"{B}.key", new_key_line("k1"))
    assert store.keys(B) is None  # looked at again only after check_every_s
    now[0] = 2
    assert store.keys(B) is not None
    with pytest.raises(KeyFileError, match="cannot be read: No such file"):
        KeyStore(tmp_path / "nope")


def test_agent_command_refuses_a_group_readable_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "agent.key"
    write_key_file(key, new_key_line())
    os.chmod(key, 0o640)
    text = (REPO / "configs" / "agents" / "example.yaml").read_text()
    text = text.replace("/etc/rackpower/agent.key", str(key))
    assert str(key) in text
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    assert cmd_agent(argparse.Namespace(config=str(cfg), log_level="error")) == 2
    err = capsys.readouterr().err
    assert "auth.key_file" in err and "chmod 600" in err


def test_sign_and_verify_cost_is_negligible_at_9000_agents() -> None:
    """Measured, and bounded loosely (a shared 2-core machine): sealing + opening one lease
    must stay far below what 9,000 agents at one lease a second would notice."""
    data = payload()
    n = 2000
    per_s = (
        min(
            timeit.repeat(
                lambda: open_sealed("lease", A, seal("lease", A, data, K1), [K1]),
                number=n,
                repeat=3,
            )
        )
        / n
    )
    print(f"seal+open one lease: {per_s * 1e6:.1f} us")
    assert per_s < 200e-6
