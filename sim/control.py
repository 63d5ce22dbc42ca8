"""Control channel of a running simulator: loopback HTTP/JSON to act on it from outside.

A test or an operator switches faults, steps the load, drops a feed and reads what a
device serves, while real tools poll the Modbus/SNMP ports::

    curl -s $URL/v1/state
    curl -s $URL/v1/points/shelf-row-1/input_power_w
    curl -s -X PUT $URL/v1/faults/pdu-row-1-rack-1 -d '{"kind": "timeout"}'
    curl -s -X DELETE $URL/v1/faults/pdu-row-1-rack-1
    curl -s -X POST $URL/v1/load-step -d '{"scale": 1.3}'
    curl -s -X POST $URL/v1/sources/utility-a/lose     # .../restore
    curl -s -X PUT $URL/v1/extra-load/row-1-rack-1 -d '{"power_w": 6000}'  # DELETE ends it
    curl -s -X POST $URL/v1/reclose -d '{}'            # reset tripped breakers

FastAPI on uvicorn inside the simulator's event loop, so handlers act on the runtime
without locks. It binds loopback by default and has no authentication: it is a test
and demo harness, not a production interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sim.faults import Fault, FaultKind
from sim.runtime import SimRuntime


class FaultBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["delay", "timeout", "exception", "garbage", "gone"]
    delay_s: float = Field(0.0, ge=0, le=60)
    exception_code: int = Field(4, ge=1, le=255)


class LoadStep(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    scale: float = Field(ge=0, le=10)


class ExtraLoad(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    power_w: float = Field(ge=0, le=10_000_000)


class Reclose(BaseModel):
    model_config = ConfigDict(extra="forbid")

    elements: list[str] | None = None


M = TypeVar("M", bound=BaseModel)


async def _body(request: Request, model: type[M]) -> M:
    """The JSON body whatever its content type: ``curl -d '{...}'`` says form-urlencoded."""
    try:
        return model.model_validate_json(await request.body() or b"{}")
    except ValidationError as exc:
        raise HTTPException(422, exc.errors(include_url=False, include_context=False)) from None


def control_app(sim: SimRuntime) -> FastAPI:
    app = FastAPI(title="rackpower simulator control", version="1")

    def known(device: str) -> None:
        if device not in sim.fault_targets():
            raise HTTPException(404, f"no device or GPU {device!r} in this site")

    @app.get("/v1/state")
    async def state() -> dict[str, Any]:
        return sim.summary()

    @app.get("/v1/endpoints")
    async def endpoints() -> list[dict[str, Any]]:
        return sim.endpoints()

    @app.get("/v1/points/{device}")
    async def points(device: str) -> dict[str, Any]:
        known(device)
        return {"device": device, "t_s": sim.t_s, "points": sim.source.points(device)}

    @app.get("/v1/points/{device}/{point}")
    async def point(device: str, point: str) -> dict[str, Any]:
        known(device)
        value = sim.value(device, point)
        if value is None:
            raise HTTPException(404, f"{device} has no live value for {point!r}")
        return {"device": device, "point": point, "value": value, "t_s": sim.t_s}

    @app.get("/v1/faults")
    async def faults() -> dict[str, Any]:
        return dict(sim.summary()["faults"])

    @app.put("/v1/faults/{device}")
    async def set_fault(device: str, request: Request) -> dict[str, Any]:
        known(device)
        body = await _body(request, FaultBody)
        sim.set_fault(device, Fault(FaultKind(body.kind), body.delay_s, body.exception_code))
        return {"device": device, "fault": body.model_dump()}

    @app.delete("/v1/faults/{device}")
    async def clear_fault(device: str) -> dict[str, Any]:
        known(device)
        sim.set_fault(device, None)
        return {"device": device, "fault": None}

    @app.delete("/v1/faults")
    async def clear_faults() -> dict[str, Any]:
        sim.faults.clear()
        return {"faults": {}}

    @app.post("/v1/load-step")
    async def load_step(request: Request) -> dict[str, Any]:
        body = await _body(request, LoadStep)
        sim.load_step(body.scale)
        return {"load_scale": sim.load_scale}

    @app.put("/v1/extra-load/{node}")
    async def set_extra_load(node: str, request: Request) -> dict[str, Any]:
        body = await _body(request, ExtraLoad)
        try:
            sim.set_extra_load(node, body.power_w)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return {"extra_load_w": sim.extra_load_w}

    @app.delete("/v1/extra-load/{node}")
    async def clear_extra_load(node: str) -> dict[str, Any]:
        try:
            sim.set_extra_load(node, 0.0)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return {"extra_load_w": sim.extra_load_w}

    @app.post("/v1/sources/{source_id}/{action}")
    async def source(source_id: str, action: Literal["lose", "restore"]) -> dict[str, Any]:
        try:
            (sim.lose_source if action == "lose" else sim.restore_source)(source_id)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return {"lost_sources": sorted(sim.lost_sources)}

    @app.post("/v1/reclose")
    async def reclose(request: Request) -> dict[str, Any]:
        body = await _body(request, Reclose)
        return {"reclosed": sim.reclose(body.elements)}

    return app


class _Quiet(uvicorn.Server):
    """uvicorn that leaves the process's signals to ``rackpower sim``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ControlServer:
    """``async with ControlServer(sim, port=0) as ctl: ctl.url``."""

    def __init__(self, sim: SimRuntime, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._requested_port = port
        config = uvicorn.Config(
            control_app(sim),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        self._server = _Quiet(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen first (a taken port is an OSError here), then serve in a task."""
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, self._requested_port))
        self._sock.listen(64)
        self._sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._sock]), name="sim-control"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._task, 3.0)
            self._task = None
        self._sock.close()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
