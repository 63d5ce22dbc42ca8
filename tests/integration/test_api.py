"""The HTTP API on a real uvicorn on a loopback port, spoken to with httpx.

The daemon is not part of this test: the API reads a :class:`MemoryView` holding the
numbers below, the same Protocol the daemon implements. Time is a fake clock the test
moves, so expiry is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.cli import status_cmd
from controller.core.alarms import Alarm, AlarmKind
from controller.core.view import CapRow, Health, MemoryView, NodeLive
from controller.integrations.api.app import ApiServer, History, create_app, resolve_api_token
from controller.model.config import ApiConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.helpers.api import serving
from tests.helpers.clock import ManualClock
from tests.sites import tiny_site

NOW_S = 1_750_000_000.0


def _alarm(kind: AlarmKind, node: str, message: str, since_s: float) -> Alarm:
    """A node alarm as the daemon raises it (subject and node are the node)."""
    return Alarm(kind, node, message, since_s, node=node)


TOKEN = "t0k3n-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# The tiny site (tests/sites.py): envelopes feed 18 kW, sst 17, bus 16, row 15, racks 7,
# servers 2.2 kW (rating = 200 W baseline + 4 x 500 W GPUs).
LIVE = {
    "feed": NodeLive("feed", envelope_w=18000, power_w=12000, estimated_w=11800),
    "sst": NodeLive("sst", envelope_w=17000, power_w=None, estimated_w=11900),
    "bus": NodeLive("bus", envelope_w=16000, power_w=None, estimated_w=11900),
    "row": NodeLive("row", envelope_w=15000, power_w=12500, estimated_w=11900),
    "rack-1": NodeLive(
        "rack-1",
        envelope_w=7000,
        power_w=6500,
        estimated_w=6200,
        capped_gpus=4,
        cap_limit_w=350,
        mode="cap",
        trip_used=0.25,
        alarms=(_alarm(AlarmKind.TRIP_RISK, "rack-1", "rack-1 at 93 % for 40 s", NOW_S - 40),),
    ),
    "rack-2": NodeLive("rack-2", envelope_w=7000, power_w=5000, estimated_w=5400),
    "rack-1-n1": NodeLive("rack-1-n1", envelope_w=2200, estimated_w=2100),
    # A silent meter: the reading is not trusted, the server counts at its rating.
    "rack-1-n2": NodeLive("rack-1-n2", envelope_w=2200, power_w=1000, estimated_w=1500, stale=True),
    "rack-2-n1": NodeLive("rack-2-n1", envelope_w=2200, estimated_w=1800),
    # rack-2-n2 is absent: no data yet, counts at its rating too.
}

# (envelope_w, power_w, load = max(measured, estimated) or rating when unknown) per node,
# written out by hand so the test does not reuse the code under test.
EXPECTED = {
    "feed": (18000, 12000, 12000),
    "sst": (17000, None, 11900),
    "bus": (16000, None, 11900),
    "row": (15000, 12500, 12500),
    "rack-1": (7000, 6500, 6500),
    "rack-1-n1": (2200, None, 2100),
    "rack-1-n2": (2200, 1000, 2200),
    "rack-2": (7000, 5000, 5400),
    "rack-2-n1": (2200, None, 1800),
    "rack-2-n2": (2200, None, 2200),
}


@pytest.fixture
def tree() -> PowerTree:
    return PowerTree(parse_site(tiny_site()))


@pytest.fixture
def view(tree: PowerTree) -> MemoryView:
    return MemoryView(
        tree,
        live=dict(LIVE),
        cap_rows=[
            CapRow(
                job_id="train-7",
                node_id="rack-1",
                servers=("rack-1-n1",),
                gpu_count=4,
                limit_w=350.0,
                reason="rack-1 above 97 % of 7000 W",
                since_s=NOW_S - 12,
                lease_expires_s=NOW_S + 8,
            )
        ],
        health_info=Health(
            status="ok",
            mode="enforce",
            started_at_s=NOW_S - 600,
            last_cycle_at_s=NOW_S - 0.2,
            cycle_s=0.5,
            cycles=1200,
            overruns=3,
            devices_total=3,
            devices_stale=1,
            agents_total=4,
        ),
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW_S)


@pytest.fixture
async def api(
    view: MemoryView, clock: ManualClock
) -> AsyncIterator[tuple[ApiServer, httpx.AsyncClient]]:
    app = create_app(
        view, ApiConfig(token_env="RP_TOKEN"), clock=clock, environ={"RP_TOKEN": TOKEN}
    )
    async with serving(app) as pair:
        yield pair


async def headroom_by_id(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    r = await client.get("/v1/headroom")
    assert r.status_code == 200, r.text
    return {n["id"]: n for n in r.json()["nodes"]}


async def reserve(
    client: httpx.AsyncClient, node: str, watts: float, ttl_s: float = 60
) -> httpx.Response:
    return await client.post(
        "/v1/reservations",
        json={"node": node, "watts": watts, "ttl_s": ttl_s, "job_id": f"job-{node}"},
        headers=AUTH,
    )


# ---------------------------------------------------------------------------
# Headroom


async def test_headroom_is_envelope_minus_load_minus_reserved(api: Any) -> None:
    _, client = api
    rows = await headroom_by_id(client)
    assert list(rows) == list(EXPECTED)  # tree order, GPUs left out
    for nid, (env, power, load) in EXPECTED.items():
        row = rows[nid]
        assert row["envelope_w"] == env, nid
        assert row["power_w"] == power, nid
        assert row["reserved_w"] == 0.0, nid
        assert row["headroom_w"] == env - load, nid
        assert set(row) == {
            "id",
            "kind",
            "envelope_w",
            "power_w",
            "reserved_w",
            "headroom_w",
            "available_w",
        }
    # available = least headroom on the way up: rack-1 500 W, under a row with 2500 W.
    assert rows["rack-1"]["available_w"] == 500
    assert rows["rack-1-n1"]["available_w"] == 100
    assert rows["rack-2"]["available_w"] == 1600
    assert rows["row"]["available_w"] == 2500


async def test_headroom_of_one_node_and_unknown_nodes(api: Any) -> None:
    _, client = api
    r = await client.get("/v1/headroom", params={"node": "rack-2"})
    assert r.status_code == 200
    assert r.json() == {
        "nodes": [
            {
                "id": "rack-2",
                "kind": "rack",
                "envelope_w": 7000.0,
                "power_w": 5000.0,
                "reserved_w": 0.0,
                "headroom_w": 1600.0,
                "available_w": 1600.0,
            }
        ]
    }
    for node, words in (("rack-9", "no node 'rack-9'"), ("rack-1-n1-g0", "GPUs have no headroom")):
        r = await client.get("/v1/headroom", params={"node": node})
        assert r.status_code == 404
        assert words in r.json()["detail"]


async def test_envelope_override_in_the_view_lowers_headroom(api: Any, view: MemoryView) -> None:
    """The view's envelope is the one in force (a BMS demand response here)."""
    _, client = api
    view.live["rack-2"] = NodeLive("rack-2", envelope_w=6000, power_w=5000, estimated_w=5400)
    rows = await headroom_by_id(client)
    assert (rows["rack-2"]["envelope_w"], rows["rack-2"]["headroom_w"]) == (6000, 600)


# ---------------------------------------------------------------------------
# Reservations


async def test_reservation_reduces_headroom_of_node_and_ancestors(api: Any) -> None:
    _, client = api
    before = await headroom_by_id(client)
    r = await reserve(client, "rack-2", 1000)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["node"], body["watts"], body["job_id"]) == ("rack-2", 1000.0, "job-rack-2")
    assert body["created_at_s"] == NOW_S
    assert body["expires_at_s"] == NOW_S + 60
    assert r.headers["location"] == f"/v1/reservations/{body['id']}"

    after = await headroom_by_id(client)
    for nid in ("rack-2", "row", "bus", "sst", "feed"):
        assert after[nid]["reserved_w"] == 1000, nid
        assert after[nid]["headroom_w"] == before[nid]["headroom_w"] - 1000, nid
    for nid in ("rack-1", "rack-1-n1", "rack-2-n1"):
        assert after[nid] == before[nid], nid

    listed = (await client.get("/v1/reservations")).json()["reservations"]
    assert listed == [body]
    events = (await client.get("/v1/events", params={"kind": "reservation"})).json()["events"]
    assert [(e["node"], e["job_id"], e["details"]["reservation_id"]) for e in events] == [
        ("rack-2", "job-rack-2", body["id"])
    ]
    assert events[0]["readings"]["rack-2.free_w"] == 1600  # what it was granted on


async def test_reservation_larger_than_headroom_is_409_and_changes_nothing(api: Any) -> None:
    _, client = api
    r = await reserve(client, "rack-1", 501)
    assert r.status_code == 409
    assert r.json() == {
        "detail": "not enough headroom under 'rack-1': requested 501 W, available 500 W",
        "node": "rack-1",
        "limiting_node": "rack-1",
        "requested_w": 501.0,
        "available_w": 500.0,
    }
    rows = await headroom_by_id(client)
    assert all(row["reserved_w"] == 0 for row in rows.values())
    events = (await client.get("/v1/events")).json()["events"]
    assert [(e["kind"], e["node"]) for e in events] == [("refusal", "rack-1")]


async def test_reservation_refused_by_an_ancestor(api: Any) -> None:
    """rack-2 has 1600 W of its own, but the row keeps only 500 W after a row reservation."""
    _, client = api
    assert (await reserve(client, "row", 2000)).status_code == 201
    r = await reserve(client, "rack-2", 600)
    assert r.status_code == 409
    assert (r.json()["limiting_node"], r.json()["available_w"]) == ("row", 500)
    assert (await reserve(client, "rack-2", 500)).status_code == 201
    rows = await headroom_by_id(client)
    assert rows["row"]["headroom_w"] == 0
    assert rows["rack-2"]["available_w"] == 0


async def test_reservation_expires_by_itself(api: Any, clock: ManualClock) -> None:
    _, client = api
    rid = (await reserve(client, "rack-2", 1500, ttl_s=30)).json()["id"]
    assert (await reserve(client, "rack-2", 200)).status_code == 409
    clock.now_s = NOW_S + 29.5
    assert (await headroom_by_id(client))["rack-2"]["reserved_w"] == 1500
    clock.now_s = NOW_S + 30
    rows = await headroom_by_id(client)
    assert (rows["rack-2"]["reserved_w"], rows["rack-2"]["headroom_w"]) == (0, 1600)
    assert (await client.get("/v1/reservations")).json()["reservations"] == []
    r = await client.delete(f"/v1/reservations/{rid}", headers=AUTH)
    assert r.status_code == 404
    assert (await reserve(client, "rack-2", 200)).status_code == 201


async def test_delete_releases_the_power(api: Any) -> None:
    _, client = api
    made = (await reserve(client, "rack-1", 400)).json()
    r = await client.delete(f"/v1/reservations/{made['id']}", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == made
    rows = await headroom_by_id(client)
    assert (rows["rack-1"]["reserved_w"], rows["feed"]["reserved_w"]) == (0, 0)
    r = await client.delete(f"/v1/reservations/{made['id']}", headers=AUTH)
    assert r.status_code == 404
    assert made["id"] in r.json()["detail"]
    kinds = [e["kind"] for e in (await client.get("/v1/events")).json()["events"]]
    assert kinds == ["reservation", "release"]


# ---------------------------------------------------------------------------
# Authentication


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer wrong"}, "wrong token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "wrong token"),
        ({"Authorization": f"Basic {TOKEN}"}, "missing bearer token"),
    ],
)
async def test_mutations_need_the_token(api: Any, headers: dict[str, str], detail: str) -> None:
    _, client = api
    body = {"node": "rack-2", "watts": 100, "ttl_s": 60, "job_id": "j"}
    r = await client.post("/v1/reservations", json=body, headers=headers)
    assert (r.status_code, r.json()["detail"]) == (401, detail)
    assert r.headers["www-authenticate"] == "Bearer"
    assert (await client.get("/v1/reservations")).json()["reservations"] == []
    made = (await reserve(client, "rack-2", 100)).json()
    r = await client.delete(f"/v1/reservations/{made['id']}", headers=headers)
    assert r.status_code == 401
    assert [x["id"] for x in (await client.get("/v1/reservations")).json()["reservations"]] == [
        made["id"]
    ]


async def test_no_token_configured_refuses_mutations_unless_allowed(view: MemoryView) -> None:
    body = {"node": "rack-2", "watts": 100, "ttl_s": 60, "job_id": "j"}
    async with serving(create_app(view, ApiConfig())) as (_, client):
        r = await client.post("/v1/reservations", json=body, headers=AUTH)
        assert r.status_code == 503
        assert "no API token is configured" in r.json()["detail"]
        assert (await client.get("/v1/headroom")).status_code == 200  # reading stays open
    async with serving(create_app(view, ApiConfig(), allow_unauthenticated=True)) as (_, client):
        r = await client.post("/v1/reservations", json=body)
        assert r.status_code == 201
        assert len((await client.get("/v1/reservations")).json()["reservations"]) == 1


def test_token_sources(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(" from-file\n")
    assert resolve_api_token(ApiConfig(token_file=token_file)) == "from-file"
    assert resolve_api_token(ApiConfig(token_env="X"), {"X": "from-env"}) == "from-env"
    assert resolve_api_token(ApiConfig()) is None
    with pytest.raises(ValueError, match="environment variable X is not set"):
        resolve_api_token(ApiConfig(token_env="X"), {})
    with pytest.raises(ValueError, match="cannot read"):
        resolve_api_token(ApiConfig(token_file=tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_api_token(ApiConfig(token_file=tmp_path / "empty"))


# ---------------------------------------------------------------------------
# Bad input: 4xx with the reason, never 5xx

GOOD = {"node": "rack-2", "watts": 100, "ttl_s": 60, "job_id": "j-1"}


def body_with(**changes: Any) -> dict[str, Any]:
    out = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not ...}


BAD_POSTS: list[tuple[str, Any, int, str]] = [
    ("missing watts", body_with(watts=...), 422, "watts"),
    ("watts as text", body_with(watts="100"), 422, "watts"),
    ("watts as bool", body_with(watts=True), 422, "watts"),
    ("zero watts", body_with(watts=0), 422, "watts"),
    ("negative watts", body_with(watts=-5), 422, "watts"),
    ("absurd watts", body_with(watts=1e12), 422, "watts"),
    ("zero ttl", body_with(ttl_s=0), 422, "ttl_s"),
    ("sub-second ttl", body_with(ttl_s=0.5), 422, "ttl_s"),
    ("sub-watt", body_with(watts=5e-324), 422, "watts"),
    ("ttl over a day", body_with(ttl_s=86_401), 422, "ttl_s"),
    ("empty job id", body_with(job_id=""), 422, "job_id"),
    ("job id with space", body_with(job_id="a b"), 422, "job_id"),
    ("job id too long", body_with(job_id="j" * 201), 422, "job_id"),
    ("node as number", body_with(node=5), 422, "node"),
    ("empty node", body_with(node=""), 422, "node"),
    ("unknown field", body_with(priority="high"), 422, "priority"),
    ("a list", [GOOD], 422, "body"),
    ("null", None, 422, "body"),
    ("unknown node", body_with(node="rack-9"), 404, "no node 'rack-9'"),
    ("a GPU", body_with(node="rack-1-n1-g0"), 404, "GPUs have no headroom"),
]
BAD_RAW: list[tuple[str, bytes, str, int, str]] = [
    (
        "NaN",
        b'{"node":"rack-2","watts":NaN,"ttl_s":60,"job_id":"j"}',
        "application/json",
        422,
        "watts",
    ),
    (
        "Infinity",
        b'{"node":"rack-2","watts":1e400,"ttl_s":60,"job_id":"j"}',
        "application/json",
        422,
        "watts",
    ),
    ("not JSON", b"watts=100", "application/json", 422, "json"),
    ("form", b"node=rack-2&watts=100", "application/x-www-form-urlencoded", 422, "body"),
    ("empty", b"", "application/json", 422, "body"),
    ("not UTF-8", b'{"node":"\xff\xfe"}', "application/json", 400, "error parsing the body"),
]
BAD_GETS: list[tuple[str, str, int, str]] = [
    ("GET", "/v1/headroom?node=", 422, "node"),
    ("GET", "/v1/headroom?node=nope", 404, "no node 'nope'"),
    ("GET", "/v1/headroom?down_to=gpu", 422, "down_to"),
    ("GET", "/v1/tree?down_to=planet", 422, "down_to"),
    ("GET", "/v1/events?limit=0", 422, "limit"),
    ("GET", "/v1/events?limit=lots", 422, "limit"),
    ("GET", "/v1/events?since=-1", 422, "since"),
    ("GET", "/v1/events?kind=" + "k" * 65, 422, "kind"),
    ("GET", "/v1/history?node=nope", 404, "no node 'nope'"),
    ("GET", "/v1/nothing", 404, "Not Found"),
    ("PUT", "/v1/reservations", 405, "Method Not Allowed"),
    ("DELETE", "/v1/reservations/%00weird", 404, "no active reservation"),
    ("GET", "/static/../api.py", 404, ""),
]


def where(detail: Any) -> str:
    """The text a client sees: a message, or the field locations of a 422."""
    if isinstance(detail, list):
        return " ".join(".".join(map(str, e["loc"])) + " " + e["msg"] for e in detail)
    return str(detail)


async def test_bad_input_answers_4xx_with_the_reason(api: Any) -> None:
    _, client = api
    seen: list[tuple[str, int]] = []
    for name, body, code, words in BAD_POSTS:
        r = await client.post("/v1/reservations", json=body, headers=AUTH)
        seen.append((name, r.status_code))
        assert r.status_code == code, (name, r.text)
        assert words in where(r.json()["detail"]), (name, r.text)
    for name, raw, ctype, code, words in BAD_RAW:
        r = await client.post(
            "/v1/reservations", content=raw, headers={**AUTH, "Content-Type": ctype}
        )
        assert r.status_code == code, (name, r.text)
        assert words in where(r.json()["detail"]).lower(), (name, r.text)
    for method, path, code, words in BAD_GETS:
        r = await client.request(method, path, headers=AUTH)
        assert r.status_code == code, (path, r.text)
        assert words in where(r.json()["detail"]), (path, r.text)
    # Nothing of it was stored.
    assert (await client.get("/v1/reservations")).json()["reservations"] == []
    assert all(row["reserved_w"] == 0 for row in (await headroom_by_id(client)).values())


# ---------------------------------------------------------------------------
# Tree, caps, events, health, history


async def test_tree_carries_caps_alarms_and_levels(api: Any) -> None:
    _, client = api
    tree = (await client.get("/v1/tree")).json()
    assert (tree["site"], tree["mode"], tree["now_s"]) == ("tiny", "enforce", NOW_S)
    nodes = {n["id"]: n for n in tree["nodes"]}
    rack = nodes["rack-1"]
    assert (rack["parent"], rack["depth"], rack["rating_w"]) == ("row", 4, 8000)
    assert (rack["load_w"], rack["estimated_w"], rack["trip_used"]) == (6500, 6200, 0.25)
    assert rack["cap"] == {"capped_gpus": 4, "limit_w": 350.0, "mode": "cap"}
    assert rack["alarms"] == [
        {"kind": "trip_risk", "message": "rack-1 at 93 % for 40 s", "since_s": NOW_S - 40}
    ]
    assert nodes["rack-1-n2"]["stale"] is True and nodes["rack-1-n2"]["load_w"] == 2200
    assert nodes["rack-2-n2"]["stale"] is True  # no data at all
    assert nodes["rack-2"]["stale"] is False
    racks = (await client.get("/v1/tree", params={"down_to": "rack"})).json()["nodes"]
    assert [n["id"] for n in racks] == ["feed", "sst", "bus", "row", "rack-1", "rack-2"]


async def test_caps_events_health(api: Any, clock: ManualClock) -> None:
    _, client = api
    caps = (await client.get("/v1/caps")).json()["caps"]
    assert caps == [
        {
            "job_id": "train-7",
            "node_id": "rack-1",
            "servers": ["rack-1-n1"],
            "gpu_count": 4,
            "limit_w": 350.0,
            "reason": "rack-1 above 97 % of 7000 W",
            "since_s": NOW_S - 12,
            "lease_expires_s": NOW_S + 8,
        }
    ]
    assert (await client.get("/v1/events")).json() == {"last_seq": 0, "events": []}
    await reserve(client, "rack-2", 100)
    await reserve(client, "rack-2", 10_000)
    page = (await client.get("/v1/events", params={"since": 1})).json()
    assert page["last_seq"] == 2
    assert [e["kind"] for e in page["events"]] == ["refusal"]
    clock.now_s = NOW_S + 0.3
    health = (await client.get("/v1/health")).json()
    assert health == {
        "status": "ok",
        "site": "tiny",
        "mode": "enforce",
        "now_s": NOW_S + 0.3,
        "started_at_s": NOW_S - 600,
        "last_cycle_at_s": NOW_S - 0.2,
        "cycle_age_s": pytest.approx(0.5),
        "cycle_s": 0.5,
        "cycles": 1200,
        "overruns": 3,
        "devices_total": 3,
        "devices_stale": 1,
        "agents_total": 4,
        "agents_lost": 0,
        "agents_failsafe": 0,
        "reservations": 1,
        "reasons": [],
        "message": "",
    }


async def test_health_serves_degraded_with_its_reasons_as_200(api: Any, view: MemoryView) -> None:
    """The contract: /v1/health answers 200 whatever the status (a probe reads the body);
    what makes it degraded is listed, and /metrics' rackpower_up follows it."""
    _, client = api
    lost = "4 of 4 agents lost: a-1, a-2, a-3, a-4"
    view.health_info = Health(
        status="degraded",
        mode="enforce",
        started_at_s=NOW_S - 600,
        last_cycle_at_s=NOW_S - 0.2,
        agents_total=4,
        agents_lost=4,
        reasons=(lost,),
        message=lost,
    )
    r = await client.get("/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert (body["status"], body["agents_lost"], body["reasons"]) == ("degraded", 4, [lost])
    up = samples((await client.get("/metrics")).text)[("rackpower_up", ())]
    assert up == 0.0


async def test_history_is_sampled_while_serving(view: MemoryView) -> None:
    app = create_app(view, ApiConfig(), history=History(period_s=0.02, span_s=0.2))
    async with serving(app) as (_, client):
        for _ in range(500):
            hist = (await client.get("/v1/history", params={"node": "row"})).json()
            if len(hist["ts_s"]) >= 10:
                break
            await asyncio.sleep(0.02)
        assert len(hist["ts_s"]) == 10  # span / period: older samples dropped
        assert set(hist["load_w"]) == {12500.0}
        assert set(hist["envelope_w"]) == {15000.0}
        assert set(hist["power_w"]) == {12500.0}
        assert hist["ts_s"] == sorted(hist["ts_s"])
        default = (await client.get("/v1/history")).json()
        assert default["node"] == "feed"


# ---------------------------------------------------------------------------
# Metrics and OpenAPI


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_expose_tree_and_daemon_series(api: Any) -> None:
    server, client = api
    mets = server.app.state.metrics  # the instance the daemon would update
    mets.observe_cycle(0.04)
    mets.observe_cycle(0.7, overrun=True)
    mets.observe_poll("pdu-1", 0.02)
    mets.observe_poll("pdu-1", 0.5)
    mets.set_device_errors_source(lambda: {("pdu-1", "timeout"): 1})
    mets.count_violations(["rack-1"])
    mets.set_tsdb_dropped(5)
    mets.set_tsdb_dropped(3)  # a restarted writer's smaller total does not lower a counter
    mets.set_tsdb_dropped(8)
    await reserve(client, "rack-2", 1000)

    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)

    def node(name: str, nid: str, kind: str) -> float:
        return got[(name, (("kind", kind), ("node", nid)))]

    assert node("rackpower_node_headroom_watts", "rack-1", "rack") == 500
    assert node("rackpower_node_headroom_watts", "rack-2", "rack") == 600
    assert node("rackpower_node_reserved_watts", "feed", "feed") == 1000
    assert node("rackpower_node_envelope_watts", "row", "row") == 15000
    assert node("rackpower_node_power_watts", "row", "row") == 12500
    assert math.isnan(node("rackpower_node_power_watts", "sst", "sst"))
    assert node("rackpower_node_load_watts", "rack-1-n2", "node") == 2200
    assert node("rackpower_node_capped_gpus", "rack-1", "rack") == 4
    assert node("rackpower_node_alarms", "rack-1", "rack") == 1
    assert got[("rackpower_cycle_overruns_total", ())] == 1
    assert got[("rackpower_cycle_duration_seconds_count", ())] == 2
    assert got[("rackpower_cycle_duration_seconds_bucket", (("le", "0.05"),))] == 1
    assert got[("rackpower_device_errors_total", (("device", "pdu-1"), ("kind", "timeout")))] == 1
    assert got[("rackpower_poll_duration_seconds_count", (("device", "pdu-1"),))] == 2
    assert got[("rackpower_envelope_violations_total", (("node", "rack-1"),))] == 1
    assert got[("rackpower_tsdb_dropped_points_total", ())] == 8
    assert got[("rackpower_caps_active", ())] == 1
    assert got[("rackpower_capped_gpus", ())] == 4
    assert got[("rackpower_reservations_active", ())] == 1
    assert got[("rackpower_actions_total", (("kind", "reservation"),))] == 1
    assert got[("rackpower_info", (("mode", "enforce"), ("site", "tiny")))] == 1
    assert got[("rackpower_up", ())] == 1
    # No per-GPU series unless asked for: cardinality stays per server.
    assert not any("-g" in dict(labels).get("node", "") for _, labels in got)
    assert not any(name.startswith("rackpower_gpu_") for name, _ in got)


async def test_openapi_lists_every_path(api: Any) -> None:
    _, client = api
    spec = (await client.get("/openapi.json")).json()
    assert set(spec["paths"]) == {
        "/v1/health",
        "/v1/tree",
        "/v1/headroom",
        "/v1/reservations",
        "/v1/reservations/{reservation_id}",
        "/v1/caps",
        "/v1/events",
        "/v1/history",
        "/metrics",
    }
    post = spec["paths"]["/v1/reservations"]["post"]
    assert {"201", "400", "401", "404", "409", "422", "503"} <= set(post["responses"])
    assert post["security"] == [{"HTTPBearer": []}]
    assert "get" in spec["paths"]["/v1/reservations"]


async def test_status_page_and_its_files_are_served(api: Any) -> None:
    _, client = api
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/status.js">' in page.text
    js = await client.get("/static/status.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert "/v1/tree" in js.text
    assert (await client.get("/static/status.css")).status_code == 200


# ---------------------------------------------------------------------------
# The server inside a loop, and the CLI


async def test_server_binds_port_zero_closes_on_shutdown_and_leaves_signals(
    view: MemoryView,
) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    server = ApiServer(create_app(view, ApiConfig()), port=0)
    port = server.bind()
    assert port > 0 and server.url == f"http://127.0.0.1:{port}"
    task = asyncio.create_task(server.serve())
    await server.wait_started()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{server.url}/v1/health")).json()["status"] == "ok"
    await server.shutdown()
    await task
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


async def test_taken_port_is_an_oserror_not_an_exit(view: MemoryView) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = ApiServer(create_app(view, ApiConfig()), port=taken.getsockname()[1])
        with pytest.raises(OSError):
            await server.serve()
        with pytest.raises(RuntimeError, match="stopped before it started"):
            await server.wait_started()


async def test_cancelling_serve_closes_the_socket(view: MemoryView) -> None:
    server = ApiServer(create_app(view, ApiConfig()))
    port = server.bind()
    task = asyncio.create_task(server.serve())
    await server.wait_started()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def run_status(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="rackpower")
    status_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", *argv])
    code: int = args.handler(args)
    return code


async def test_status_command_prints_the_tree(api: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server, client = api
    await reserve(client, "rack-2", 1000)
    code = await asyncio.to_thread(run_status, ["--url", server.url])
    out = capsys.readouterr().out
    assert code == 0
    assert "site tiny · ok · mode enforce · 1200 cycles, 3 overruns" in out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert set(lines) >= set(EXPECTED)
    assert "500 W" in lines["rack-1"] and "trip_risk" in lines["rack-1"]
    assert "4 @ 350 W" in lines["rack-1"]
    assert "1.00 kW" in lines["rack-2"] and "600 W" in lines["rack-2"]  # reserved, headroom
    assert "(stale)" in lines["rack-1-n2"]
    code = await asyncio.to_thread(run_status, ["--url", server.url, "--down-to", "row"])
    out = capsys.readouterr().out
    assert "rack-1" not in out and "row" in out


def test_status_command_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: connection refused
        assert run_status(["--url", f"http://127.0.0.1:{dead}", "--timeout", "2"]) == 1
    assert "cannot reach the controller" in capsys.readouterr().err
    assert run_status(["--url", "127.0.0.1:8080"]) == 2
    assert "must start with http://" in capsys.readouterr().err


async def test_events_filter_takes_kinds_the_daemon_adds(api: Any) -> None:
    server, client = api
    trail = server.app.state.audit  # the trail the daemon shares with the API
    trail.record("alarm:trip_risk", "rack-1 at 93 %", now_s=NOW_S, node="rack-1")
    trail.record("cap", "rack-1 over", now_s=NOW_S, node="rack-1")
    r = await client.get("/v1/events", params={"kind": "alarm:trip_risk"})
    assert [(e["kind"], e["reason"]) for e in r.json()["events"]] == [
        ("alarm:trip_risk", "rack-1 at 93 %")
    ]
    r = await client.get("/v1/events", params=[("kind", "cap"), ("kind", "nothing-such")])
    assert [e["kind"] for e in r.json()["events"]] == ["cap"]
