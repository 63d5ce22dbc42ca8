"""schemathesis (from PyPI) against the running API: no 5xx, responses as the schema says.

The API runs on a real uvicorn on a loopback port in this test's event loop, over a
:class:`MemoryView` of the tiny site (the Protocol the daemon implements); the
schemathesis CLI runs as a subprocess against its ``/openapi.json``, every check on
(server errors, status codes, content types, headers and bodies conforming to the
schema, invalid input rejected, valid input accepted, unsupported methods, auth), once
with the token and once without. Its HAR report is read back, so the assertions do not
rest on its exit code alone.

Bounded for ``make test``: a fixed seed and RACKPOWER_FUZZ_EXAMPLES examples per
operation (default 15, about 10 s a run). A longer run: RACKPOWER_FUZZ_EXAMPLES=500
RACKPOWER_FUZZ_SEED=<n>.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from controller.core.view import MemoryView
from controller.integrations.api.app import ApiServer, create_app
from controller.model.config import ApiConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.integration.test_api import LIVE
from tests.sites import tiny_site

TOKEN = "t0k3n-for-fuzzing"
EXAMPLES = int(os.environ.get("RACKPOWER_FUZZ_EXAMPLES", "15"))
SEED = int(os.environ.get("RACKPOWER_FUZZ_SEED", "1"))
ST = Path(sys.executable).parent / "st"
MUTATING = {("POST", "/v1/reservations"), ("DELETE", "/v1/reservations/{id}")}


def operation(method: str, url: str) -> tuple[str, str]:
    path = urlsplit(url).path
    if path.startswith("/v1/reservations/"):
        path = "/v1/reservations/{id}"
    return method, path


def har_entries(path: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(path.read_text())["log"]["entries"]
    return entries


async def fuzz(url: str, out: Path, headers: dict[str, str]) -> list[dict[str, Any]]:
    """One schemathesis run in ``out`` (made by the caller); its HAR entries. Fails the
    test on any finding."""
    args = [
        str(ST),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--report",
        "har",
        "--report-har-path",
        str(out / "run.har"),
    ]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=out,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    text, _ = await asyncio.wait_for(proc.communicate(), 110)
    report = text.decode(errors="replace")
    assert proc.returncode == 0, report[-6000:]
    entries = har_entries(out / "run.har")
    assert entries, report[-2000:]
    return entries


@pytest.mark.skipif(not ST.exists(), reason="schemathesis is in the dev extra")
async def test_schemathesis_finds_nothing_with_and_without_the_token(tmp_path: Path) -> None:
    for run in ("anon", "authed"):
        (tmp_path / run).mkdir()
    view = MemoryView(PowerTree(parse_site(tiny_site())), live=dict(LIVE))
    app = create_app(view, ApiConfig(token_env="RP_TOKEN"), environ={"RP_TOKEN": TOKEN})
    server = ApiServer(app, host="127.0.0.1", port=0)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.wait_started(), 10)

        # Without the token first: no state may change, every mutating call is a 401.
        anon = await fuzz(server.url, tmp_path / "anon", {})
        statuses = Counter(e["response"]["status"] for e in anon)
        assert not [s for s in statuses if s >= 500], statuses
        mutating = [
            e["response"]["status"]
            for e in anon
            if operation(e["request"]["method"], e["request"]["url"]) in MUTATING
        ]
        assert mutating and set(mutating) == {401}, Counter(mutating)
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/v1/reservations")).json()["reservations"] == []
            assert (await client.get("/v1/events")).json()["last_seq"] == 0

        # With the token: reservations are made and released, still nothing found.
        authed = await fuzz(server.url, tmp_path / "authed", {"Authorization": f"Bearer {TOKEN}"})
        statuses = Counter(e["response"]["status"] for e in authed)
        assert not [s for s in statuses if s >= 500], statuses
        made = [
            e
            for e in authed
            if operation(e["request"]["method"], e["request"]["url"]) in MUTATING
            and e["response"]["status"] in (200, 201)
        ]
        assert made, statuses  # the token was used: the mutating calls did get through
    finally:
        await server.shutdown()
        await asyncio.wait_for(task, 10)
