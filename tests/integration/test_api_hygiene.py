"""The API against hostile clients: huge bodies, bad tokens, half-open connections.

A real uvicorn on a loopback port, spoken to with raw sockets so the test controls
exactly how much of a request is sent and can see what the server does before the
client has finished (httpx would send the whole body first). No timing is asserted:
each test checks that an answer arrived *before* the client sent the rest of its
request, i.e. the order of events; the timeouts below are only how long a test waits
before it calls the answer missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from controller.core.view import MemoryView
from controller.integrations.api.app import MAX_BODY_BYTES, ApiServer, create_app
from controller.model.config import ApiConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.integration.test_api import LIVE
from tests.sites import tiny_site

TOKEN = "t0k3n-for-hygiene"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ANSWER_WAIT_S = 10.0  # how long a missing answer is waited for; never a measured figure
BIG_BYTES = 63 * 1024 * 1024  # the audit's body


@contextlib.asynccontextmanager
async def serving(body_timeout_s: float = 10.0, **server_kw: Any) -> AsyncIterator[ApiServer]:
    view = MemoryView(PowerTree(parse_site(tiny_site())), live=dict(LIVE))
    app = create_app(
        view,
        ApiConfig(token_env="RP_TOKEN"),
        environ={"RP_TOKEN": TOKEN},
        body_timeout_s=body_timeout_s,
    )
    server = ApiServer(app, host="127.0.0.1", port=0, **server_kw)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.wait_started(), 10)
        yield server
    finally:
        await server.shutdown()
        await asyncio.wait_for(task, 10)


async def connect(server: ApiServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed, as uvicorn sends JSON errors)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_WAIT_S)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await asyncio.wait_for(
        reader.readexactly(int(headers.get("content-length", "0"))), ANSWER_WAIT_S
    )
    return int(status_line.split()[1]), headers, body


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


# ---------------------------------------------------------------------------
# F1: the token before the body, and a body-size cap


@pytest.mark.parametrize(
    ("auth", "detail"),
    [({}, "missing bearer token"), ({"Authorization": "Bearer wrong"}, "wrong token")],
)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_f1_bad_token_is_answered_before_the_body_is_sent(
    auth: dict[str, str], detail: str, framing: str
) -> None:
    """The audit's 63 MB POST: on c203a14 the body was read and parsed before the token
    check, so no answer came until the whole body was in. Here the client sends the head
    and 1 KiB of body and then waits: the 401 must come while 63 MB are still unsent."""
    framing_header = (
        {"Content-Length": str(BIG_BYTES)}
        if framing == "content-length"
        else {"Transfer-Encoding": "chunked"}
    )
    async with serving() as server:
        reader, writer = await connect(server)
        try:
            head = request_head(
                "POST",
                "/v1/reservations",
                {"Content-Type": "application/json", **framing_header, **auth},
            )
            chunk = b"x" * 1024
            writer.write(head + (chunk if framing == "content-length" else b"400\r\n" + chunk))
            await writer.drain()
            status, headers, body = await read_response(reader)
            assert status == 401
            assert json.loads(body)["detail"] == detail
            assert headers["www-authenticate"] == "Bearer"
        finally:
            await close(writer)
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/v1/reservations")).json()["reservations"] == []


async def test_f1_declared_body_over_the_cap_is_413_before_it_is_sent() -> None:
    async with serving() as server:
        reader, writer = await connect(server)
        try:
            writer.write(
                request_head(
                    "POST",
                    "/v1/reservations",
                    {
                        "Content-Type": "application/json",
                        "Content-Length": str(MAX_BODY_BYTES + 1),
                        **AUTH,
                    },
                )
            )
            await writer.drain()
            status, _, body = await read_response(reader)
            assert status == 413
            assert str(MAX_BODY_BYTES) in json.loads(body)["detail"]
        finally:
            await close(writer)


async def test_f1_streamed_body_over_the_cap_is_413_while_streaming() -> None:
    """A chunked body declares no length: the cap is counted as it arrives, and the 413
    comes before the client sends its last chunk (it never does here)."""
    async with serving() as server:
        reader, writer = await connect(server)
        try:
            writer.write(
                request_head(
                    "POST",
                    "/v1/reservations",
                    {"Content-Type": "application/json", "Transfer-Encoding": "chunked", **AUTH},
                )
            )
            chunk = b" " * 4096
            for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
                writer.write(b"1000\r\n" + chunk + b"\r\n")
            await writer.drain()
            status, _, body = await read_response(reader)
            assert status == 413
            assert "too large" in json.loads(body)["detail"]
        finally:
            await close(writer)


@pytest.mark.parametrize("slowly", [False, True])
async def test_a_head_over_16_kib_is_refused(slowly: bool) -> None:
    """In one write (h11 parses a complete head whatever its size: the guard answers
    431) or trickled in 4 KiB writes (refused by the guard or by h11's incomplete-event
    limit, which answers 400, whichever sees it first)."""
    async with serving() as server:
        reader, writer = await connect(server)
        try:
            head = request_head("GET", "/v1/health", {"X-Big": "a" * 20_000})
            if slowly:
                for i in range(0, len(head), 4096):
                    writer.write(head[i : i + 4096])
                    await writer.drain()
                    await asyncio.sleep(0.01)
            else:
                writer.write(head)
                await writer.drain()
            status, _, _ = await read_response(reader)
            assert status in ((400, 431) if slowly else (431,))
        finally:
            await close(writer)


async def test_a_body_sent_too_slowly_is_408() -> None:
    """A slow sender (half its body, then nothing) is answered and cut off, instead of
    holding a request open for as long as it likes."""
    async with serving(body_timeout_s=0.5) as server:
        reader, writer = await connect(server)
        try:
            writer.write(
                request_head(
                    "POST",
                    "/v1/reservations",
                    {"Content-Type": "application/json", "Content-Length": "100", **AUTH},
                )
                + b'{"node": '
            )
            await writer.drain()
            status, headers, _ = await read_response(reader)
            assert (status, headers["connection"]) == (408, "close")
            assert await asyncio.wait_for(reader.read(), ANSWER_WAIT_S) == b""
        finally:
            await close(writer)


async def test_a_body_under_the_cap_still_works() -> None:
    async with serving() as server, httpx.AsyncClient(base_url=server.url) as client:
        ok = {"node": "rack-2", "watts": 100, "ttl_s": 60, "job_id": "j-1"}
        r = await client.post("/v1/reservations", json=ok, headers=AUTH)
        assert r.status_code == 201, r.text

        # Chunked (no Content-Length), small: counted, passed on whole.
        async def parts() -> AsyncIterator[bytes]:
            yield json.dumps({**ok, "job_id": "j-2"}).encode()

        r = await client.post(
            "/v1/reservations",
            content=parts(),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert r.status_code == 201, r.text
        got = (await client.get("/v1/reservations")).json()["reservations"]
        assert sorted(x["job_id"] for x in got) == ["j-1", "j-2"]


# ---------------------------------------------------------------------------
# 422s do not echo large inputs


async def test_validation_error_does_not_echo_a_large_input() -> None:
    async with serving() as server, httpx.AsyncClient(base_url=server.url) as client:
        big = "a b" * 15_000  # 45 kB, under the body cap, and not a valid job id
        body = {"node": "rack-2", "watts": 100, "ttl_s": 60, "job_id": big, "x" * 5000: 1}
        r = await client.post("/v1/reservations", json=body, headers=AUTH)
        assert r.status_code == 422
        assert len(r.content) < 4096, len(r.content)
        errors = r.json()["detail"]
        assert {e["loc"][-1][:10] for e in errors} >= {"job_id", "x" * 10}
        job = next(e for e in errors if e["loc"][-1] == "job_id")
        assert job["input"].startswith("a ba ba b") and "truncated" in job["input"]


# ---------------------------------------------------------------------------
# Header timeout and connection cap


async def test_half_open_connections_are_closed_and_the_cap_refuses_more() -> None:
    """The audit's 2,000 half-open connections, bounded: 4 slots, 4 connections that
    never complete a head (two silent, one with half a head, one idle after a request
    and then half a head: a kept-alive slowloris). A fifth connection, and an
    authenticated request, get a 503 while they are held; once the head timeout has
    closed them (each reads EOF), the authenticated request gets through."""
    async with serving(header_timeout_s=0.5, max_connections=4) as server:
        held = [await connect(server) for _ in range(3)]
        held[1][1].write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        reader, writer = held[2]
        writer.write(request_head("GET", "/v1/health", {}))
        status, _, _ = await read_response(reader)
        assert status == 200
        writer.write(b"GET /v1/health HTTP/1.1\r\nX-Slow: ")
        held.append(await connect(server))
        await asyncio.gather(*(w.drain() for _, w in held))
        try:
            # Full: a fifth connection is answered 503 at once, and closed.
            reader, writer = await connect(server)
            status, headers, body = await read_response(reader)
            assert (status, headers["connection"]) == (503, "close")
            assert "too many connections" in json.loads(body)["detail"]
            await close(writer)
            async with httpx.AsyncClient(base_url=server.url) as client:
                ok = {"node": "rack-2", "watts": 100, "ttl_s": 60, "job_id": "j-cap"}
                r = await client.post("/v1/reservations", json=ok, headers=AUTH)
                assert r.status_code == 503
                # The held connections are closed by the server, not by us.
                for held_reader, _ in held:
                    rest = await asyncio.wait_for(held_reader.read(), ANSWER_WAIT_S)
                    assert b"HTTP/1.1" not in rest  # closed without an answer
                assert server.connection_stats.header_timeouts == 4
                assert server.connection_stats.refused_full == 2
                r = await client.post("/v1/reservations", json=ok, headers=AUTH)
                assert r.status_code == 201, r.text
                got = (await client.get("/v1/reservations")).json()["reservations"]
                assert [x["job_id"] for x in got] == ["j-cap"]
        finally:
            for _, w in held:
                await close(w)


async def test_a_client_that_sends_its_head_in_time_is_not_cut_off() -> None:
    """The head timer is disarmed by each complete head and re-armed by each response:
    a kept-alive client that comes back in time keeps its connection."""
    async with serving(header_timeout_s=3.0) as server:
        reader, writer = await connect(server)
        try:
            for _ in range(3):
                writer.write(request_head("GET", "/v1/health", {}))
                status, _, _ = await read_response(reader)
                assert status == 200
                await asyncio.sleep(0.05)
            assert server.connection_stats.header_timeouts == 0
        finally:
            await close(writer)


# ---------------------------------------------------------------------------
# Loopback unless told otherwise


def test_the_api_binds_to_loopback_unless_told_otherwise() -> None:
    from pathlib import Path

    from controller.integrations.api.app import binding_note, is_loopback
    from controller.model.loader import load_site

    assert ApiConfig().host == "127.0.0.1"
    demo = Path(__file__).resolve().parents[2] / "configs" / "sites" / "demo.yaml"
    assert is_loopback(load_site(demo).integrations.api.host)
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "ctl.example"))
    assert "only (loopback)" in binding_note("127.0.0.1")
    assert "reachable from other machines" in binding_note("0.0.0.0")


async def test_bad_tokens_are_logged_once_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client hammering the API with bad tokens gets its 401s, and the journal gets one
    line (with the counts so far), not one per request."""
    caplog.set_level("INFO", logger="rackpower.api")
    async with serving() as server, httpx.AsyncClient(base_url=server.url) as client:
        body = {"node": "rack-2", "watts": 100, "ttl_s": 60, "job_id": "j"}
        for i in range(50):
            headers = {"Authorization": "Bearer wrong"} if i % 2 else {}
            r = await client.post("/v1/reservations", json=body, headers=headers)
            assert r.status_code == 401
    lines = [r.getMessage() for r in caplog.records if "refused before its body" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "missing bearer token" in lines[0]
