"""``rackpower headroom`` and ``rackpower reserve`` against the real API.

The API is :func:`controller.integrations.api.app.create_app` on a real uvicorn
(:class:`ApiServer`) on an ephemeral loopback port, over a :class:`MemoryView` holding fixed
numbers (the daemon is not needed to answer headroom questions). The commands run in a
worker thread, as they would in a shell, and every test reads back what the API stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.cli import headroom_cmd
from controller.core.view import MemoryView, NodeLive
from controller.integrations.api.app import ApiServer, create_app
from controller.model.config import ApiConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.helpers.api import serving
from tests.helpers.clock import ManualClock
from tests.sites import tiny_site

NOW_S = 1_750_000_000.0
TOKEN = "headroom-test-token"
REPO = Path(__file__).resolve().parents[2]
PROLOG = REPO / "configs/deploy/slurm/prolog_slurmctld.sh"
EPILOG = REPO / "configs/deploy/slurm/epilog_slurmctld.sh"

# tiny site: racks 7 kW envelope, servers 2.2 kW, row 15 kW. Headroom by hand:
# rack-1 7000-6500 = 500, rack-2 7000-5000 = 2000, row 15000-12500 = 2500,
# rack-2-n1 2200-1500 = 700 (available min(700, 2000, 2500, ...) = 700).
LIVE = {
    "feed": NodeLive("feed", envelope_w=18000, power_w=12000),
    "sst": NodeLive("sst", envelope_w=17000, estimated_w=12000),
    "bus": NodeLive("bus", envelope_w=16000, estimated_w=12000),
    "row": NodeLive("row", envelope_w=15000, power_w=12500),
    "rack-1": NodeLive("rack-1", envelope_w=7000, power_w=6500),
    "rack-2": NodeLive("rack-2", envelope_w=7000, power_w=5000),
    "rack-1-n1": NodeLive("rack-1-n1", envelope_w=2200, estimated_w=2100),
    "rack-1-n2": NodeLive("rack-1-n2", envelope_w=2200, estimated_w=2100),
    "rack-2-n1": NodeLive("rack-2-n1", envelope_w=2200, estimated_w=1500),
    "rack-2-n2": NodeLive("rack-2-n2", envelope_w=2200, estimated_w=1500),
}


@pytest.fixture
async def api(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[ApiServer, httpx.AsyncClient]]:
    monkeypatch.setenv("RACKPOWER_TOKEN", TOKEN)
    view = MemoryView(PowerTree(parse_site(tiny_site())), live=dict(LIVE))
    app = create_app(
        view, ApiConfig(token_env="RP_TOKEN"), clock=ManualClock(NOW_S), environ={"RP_TOKEN": TOKEN}
    )
    async with serving(app) as served:
        yield served


async def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = await asyncio.to_thread(headroom_cmd.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


async def reservations(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await client.get("/v1/reservations")
    got: list[dict[str, Any]] = r.json()["reservations"]
    return got


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed on return: refused


# ---------------------------------------------------------------------------
# headroom


async def test_headroom_table_shows_the_apis_numbers(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _ = api
    code, out, _ = await run(["headroom", "--url", server.url], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert list(rows) == ["feed", "sst", "bus", "row", "rack-1", "rack-1-n1", "rack-1-n2",
                          "rack-2", "rack-2-n1", "rack-2-n2"]  # fmt: skip
    # node kind envelope power reserved headroom available (values with units: 2 tokens)
    assert rows["rack-1"][1] == "rack"
    assert " ".join(rows["rack-1"][2:]) == "7.00 kW 6.50 kW 0 W 500 W 500 W"
    assert " ".join(rows["rack-2-n1"][2:]) == "2.20 kW - 0 W 700 W 700 W"
    assert " ".join(rows["row"][2:]) == "15.00 kW 12.50 kW 0 W 2.50 kW 2.50 kW"


async def test_headroom_of_one_node_as_json(api: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server, client = api
    code, out, _ = await run(
        ["headroom", "--url", server.url, "--node", "rack-2", "--json"], capsys
    )
    assert code == 0
    body = json.loads(out)
    assert [n["id"] for n in body["nodes"]] == ["rack-2"]
    assert body["nodes"][0]["headroom_w"] == 2000
    assert body == (await client.get("/v1/headroom", params={"node": "rack-2"})).json()


async def test_headroom_bad_node_url_and_unreachable(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _ = api
    code, _, err = await run(["headroom", "--url", server.url, "--node", "rack-9"], capsys)
    assert (code, "no node 'rack-9'" in err) == (2, True)
    code, _, err = await run(["headroom", "--url", "127.0.0.1:8080"], capsys)
    assert (code, "must start with http://" in err) == (2, True)
    code, _, err = await run(["headroom", "--url", dead_url(), "--timeout", "2"], capsys)
    assert (code, "cannot reach the controller" in err) == (1, True)


# ---------------------------------------------------------------------------
# reserve / release


async def test_reserve_prints_the_id_and_the_hold_counts(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server, client = api
    argv = ["reserve", "--url", server.url, "--node", "rack-2", "--watts", "1200", "--ttl", "300"]
    code, out, _ = await run([*argv, "--job", "slurm-42"], capsys)
    assert code == 0
    rid = out.strip()
    held = await reservations(client)
    assert [(r["id"], r["node"], r["watts"], r["job_id"]) for r in held] == [
        (rid, "rack-2", 1200.0, "slurm-42")
    ]
    assert held[0]["expires_at_s"] == NOW_S + 300
    # The hold is taken off the headroom the next scheduler sees, up the tree too.
    code, out, _ = await run(["headroom", "--url", server.url, "--json"], capsys)
    rows = {n["id"]: n for n in json.loads(out)["nodes"]}
    assert (rows["rack-2"]["reserved_w"], rows["rack-2"]["headroom_w"]) == (1200, 800)
    assert rows["row"]["headroom_w"] == 2500 - 1200


async def test_refusal_exits_1_with_the_reason_and_holds_nothing(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server, client = api
    argv = ["reserve", "--url", server.url, "--node", "rack-1", "--watts", "800", "--ttl", "60"]
    code, out, err = await run([*argv, "--job", "j1"], capsys)
    assert code == 1
    assert out == ""
    assert "refused: not enough headroom under 'rack-1'" in err
    assert "requested 800 W, available 500 W" in err
    assert await reservations(client) == []


async def test_release_gives_the_hold_back_once(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server, client = api
    argv = ["reserve", "--url", server.url, "--node", "rack-2-n1", "--watts", "600", "--ttl", "60"]
    code, out, _ = await run([*argv, "--job", "j2"], capsys)
    rid = out.strip()
    assert code == 0 and len(await reservations(client)) == 1
    code, out, _ = await run(["reserve", "--url", server.url, "--release", rid], capsys)
    assert code == 0
    assert out.strip() == f"released {rid}: 600 W under rack-2-n1"
    assert await reservations(client) == []
    code, _, err = await run(["reserve", "--url", server.url, "--release", rid], capsys)
    assert code == 1 and f"no active reservation '{rid}'" in err


async def test_reserve_input_and_auth_errors(
    api: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = api
    base = ["reserve", "--url", server.url, "--node", "rack-2", "--ttl", "60", "--job", "j"]
    code, _, err = await run(base, capsys)
    assert (code, "--watts required" in err) == (2, True)
    code, _, err = await run([*base, "--watts", "-5"], capsys)
    assert (code, "--watts must be a positive number" in err) == (2, True)
    code, _, err = await run([*base, "--watts", "100", "--release", "r-1"], capsys)
    assert (code, "--release takes no" in err) == (2, True)
    bad_node = ["reserve", "--url", server.url, "--node", "nowhere", "--ttl", "60", "--job", "j"]
    code, _, err = await run([*bad_node, "--watts", "100"], capsys)
    assert (code, "404: no node 'nowhere'" in err) == (2, True)
    code, _, err = await run([*base, "--watts", "100", "--token-env", "RP_UNSET_VAR"], capsys)
    assert (code, "RP_UNSET_VAR (the API token) is not set" in err) == (2, True)
    monkeypatch.setenv("RACKPOWER_TOKEN", "wrong")
    code, _, err = await run([*base, "--watts", "100"], capsys)
    assert (code, "401: wrong token" in err) == (1, True)
    assert await reservations(client) == []  # nothing got through


async def test_token_from_a_file(
    api: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = api
    monkeypatch.delenv("RACKPOWER_TOKEN")
    (tmp_path / "token").write_text(TOKEN + "\n")
    argv = ["reserve", "--url", server.url, "--node", "rack-2", "--watts", "100", "--ttl", "60"]
    code, out, _ = await run([*argv, "--job", "j", "--token-file", str(tmp_path / "token")], capsys)
    assert code == 0
    assert [r["id"] for r in await reservations(client)] == [out.strip()]


async def test_unreachable_fails_closed_unless_fail_open(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RACKPOWER_TOKEN", TOKEN)
    argv = ["reserve", "--url", dead_url(), "--node", "rack-2", "--watts", "1", "--ttl", "9"]
    code, out, err = await run([*argv, "--job", "j", "--timeout", "2"], capsys)
    assert (code, out, "cannot reach the controller" in err) == (1, "", True)
    code, out, err = await run([*argv, "--job", "j", "--timeout", "2", "--fail-open"], capsys)
    assert (code, out, "going ahead (--fail-open)" in err) == (0, "", True)


# ---------------------------------------------------------------------------
# The shipped Slurm hooks, run as slurmctld would run them (its environment variables),
# against the same API. Slurm itself is not needed: the hooks only read the variables,
# expand the node list and call the client. ``scontrol show hostnames`` needs a
# slurm.conf even to expand a list, so a stand-in that splits on commas comes first on
# PATH (the node lists below have no ranges).


def _hook_env(server: ApiServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "scontrol"  # only "show hostnames a,b" is used by the hooks
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "RACKPOWER_URL": server.url,
        "RACKPOWER_TOKEN": TOKEN,
        "RACKPOWER_CLI": f"{sys.executable} -m controller.cli.headroom_cmd",
        "RACKPOWER_STATE_DIR": str(tmp_path / "state"),
        "PYTHONPATH": str(REPO),
        "SLURM_JOB_ID": "4242",
        "RACKPOWER_RELEASE_AFTER_S": "0",  # no detached timer left behind by the test
        "RACKPOWER_HOOK_ENV": str(tmp_path / "no-such.env"),  # ignore a host's settings
        **extra,
    }
    return env


def _run_hook(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_slurm_prolog_reserves_per_node_and_epilog_releases(api: Any, tmp_path: Path) -> None:
    server, client = api
    env = _hook_env(
        server, tmp_path, SLURM_JOB_NODELIST="rack-2-n1,rack-2-n2", RACKPOWER_NODE_WATTS="500"
    )
    done = await asyncio.to_thread(_run_hook, PROLOG, env)
    assert done.returncode == 0, done.stderr
    held = sorted((r["node"], r["watts"], r["job_id"]) for r in await reservations(client))
    assert held == [("rack-2-n1", 500.0, "slurm-4242"), ("rack-2-n2", 500.0, "slurm-4242")]
    done = await asyncio.to_thread(_run_hook, EPILOG, env)
    assert done.returncode == 0, done.stderr
    assert await reservations(client) == []
    assert not (tmp_path / "state" / "4242").exists()


async def test_slurm_prolog_refused_holds_nothing_and_fails(api: Any, tmp_path: Path) -> None:
    server, client = api
    # rack-2-n1 can take 700 W, rack-1-n1 only 100 W: the second node is refused.
    env = _hook_env(
        server, tmp_path, SLURM_JOB_NODELIST="rack-2-n1,rack-1-n1", RACKPOWER_NODE_WATTS="600"
    )
    done = await asyncio.to_thread(_run_hook, PROLOG, env)
    assert done.returncode == 1
    assert "not enough headroom under 'rack-1-n1'" in done.stderr
    assert await reservations(client) == []  # the first node's hold was given back


async def test_slurm_prolog_timer_releases_once_the_job_runs(api: Any, tmp_path: Path) -> None:
    """The detached timer stands in for "the job draws power now" (Slurm has no such
    event); it must give the hold back by itself after the prolog has returned."""
    server, client = api
    env = _hook_env(
        server,
        tmp_path,
        SLURM_JOB_NODELIST="rack-2-n1",
        RACKPOWER_NODE_WATTS="300",
        RACKPOWER_RELEASE_AFTER_S="1",
    )
    done = await asyncio.to_thread(_run_hook, PROLOG, env)
    assert done.returncode == 0, done.stderr
    assert [r["node"] for r in await reservations(client)] == ["rack-2-n1"]
    for _ in range(300):  # the timer's own 1 s plus a Python start; bounded, not timed
        if not await reservations(client) and not (tmp_path / "state" / "4242").exists():
            break
        await asyncio.sleep(0.1)
    assert await reservations(client) == []
    assert not (tmp_path / "state" / "4242").exists()


async def test_slurm_prolog_without_a_node_list_it_can_expand_fails(
    api: Any, tmp_path: Path
) -> None:
    server, client = api
    env = _hook_env(server, tmp_path, SLURM_JOB_NODELIST="", RACKPOWER_NODE_WATTS="300")
    done = await asyncio.to_thread(_run_hook, PROLOG, env)
    assert done.returncode == 1
    assert await reservations(client) == []
