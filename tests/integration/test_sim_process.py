"""``rackpower sim`` as a real process, read by real tools.

The simulator runs as a subprocess on ephemeral ports; Debian's ``mbpoll`` (a Modbus
master) and net-snmp's ``snmpget`` read it over loopback and must agree with the plant's
value, which the test reads over the simulator's control channel just before and just
after the tool (the plant moves every 100 ms, so the tool's answer must equal one of the
two). Faults are switched over the control channel and must hit one device only.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.model.devices import polled_device_params
from controller.model.loader import load_site, parse_site
from drivers.devicemap import load_modbus_map
from drivers.modbus import build_modbus_devices
from drivers.reading import Quality
from drivers.snmp import build_snmp_devices
from sim.runtime import SimRuntime
from tests.helpers.tools import require_tool
from tests.sites import tiny_site

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs/sites/demo.yaml"
START_TIMEOUT_S = 60.0
ENDPOINT_KEYS = {"device", "protocol", "host", "port", "probe"}


def sim_command() -> list[str]:
    """``rackpower sim`` through the CLI once it registers the command; until then the
    same command through its own module entry point."""
    from controller.cli.main import build_parser

    subs = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    if subs and "sim" in subs[0].choices:
        return [sys.executable, "-m", "controller.cli.main", "sim"]
    return [sys.executable, "-m", "controller.cli.sim_cmd"]


@dataclass
class SimProcess:
    proc: subprocess.Popen[str]
    endpoints: list[dict[str, Any]]
    control_url: str

    def endpoint(self, device: str) -> dict[str, Any]:
        return next(e for e in self.endpoints if e["device"] == device)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.control_url + path,
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def plant_value(self, device: str, point: str) -> float:
        return float(self.call("GET", f"/v1/points/{device}/{point}")["value"])


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    tmp = tmp_path_factory.mktemp("sim")
    endpoints_json, control_json = tmp / "endpoints.json", tmp / "control.json"
    log = (tmp / "sim.log").open("w+")
    proc = subprocess.Popen(
        [
            *sim_command(),
            "--config",
            str(DEMO),
            "--ephemeral-ports",
            "--seed",
            "7",
            "--endpoints-json",
            str(endpoints_json),
            "--control-file",
            str(control_json),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not endpoints_json.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"rackpower sim did not start (exit {proc.poll()}):\n{log.read()}")
            time.sleep(0.1)
        endpoints = json.loads(endpoints_json.read_text())
        url = json.loads(control_json.read_text())["url"]
        yield SimProcess(proc, endpoints, url)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc: int | None
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        log.seek(0)
        output = log.read()
        log.close()
    assert rc == 0, f"rackpower sim exited {rc} on SIGTERM:\n{output}"


def bracketed(
    read_tool: Callable[[], float],
    read_plant: Callable[[], float],
    close: Callable[[float, float], bool],
) -> tuple[float, float, float]:
    """Plant value before, tool value, plant value after; retried while more than one
    plant step slips between the two control reads (a busy machine)."""
    for _ in range(8):
        before = read_plant()
        tool = read_tool()
        after = read_plant()
        if close(tool, before) or close(tool, after):
            return before, tool, after
    return before, tool, after


def run_tool(args: list[str], timeout_s: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)


def mbpoll_float(ep: dict[str, Any], address: int, unit: int | None = None) -> float:
    out = run_tool(
        [
            require_tool("mbpoll"),
            "-m",
            "tcp",
            "-a",
            str(unit or ep["unit_id"]),
            "-0",
            "-r",
            str(address),
            "-c",
            "1",
            "-t",
            "4:float",
            "-B",
            "-1",
            "-o",
            "1",
            "-p",
            str(ep["port"]),
            ep["host"],
        ]
    )
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith(f"[{address}]:"))
    return float(line.split("]:", 1)[1])


def snmpget(
    ep: dict[str, Any], oid: str, community: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_tool(
        [
            require_tool("snmpget", "snmp"),
            "-v2c",
            "-c",
            community or ep["community"],
            "-On",
            "-Oqv",
            "-t",
            "1",
            "-r",
            "0",
            f"{ep['host']}:{ep['port']}",
            oid,
        ]
    )


def test_endpoints_list_every_served_device(sim: SimProcess) -> None:
    devices = {e["device"] for e in sim.endpoints}
    assert devices == {"sst-1-meter", "shelf-row-1", "shelf-row-2"} | {
        f"pdu-row-{r}-rack-{k}" for r in (1, 2) for k in (1, 2, 3, 4)
    }
    for e in sim.endpoints:
        extra = {"unit_id"} if e["protocol"] == "modbus" else {"community"}
        assert set(e) == ENDPOINT_KEYS | extra, e
        assert e["host"] == "127.0.0.1" and e["port"] > 0
        assert ("address" in e["probe"]) if e["protocol"] == "modbus" else ("oid" in e["probe"])
    # The shelves sit behind one gateway port, told apart by unit id, as the config says.
    assert sim.endpoint("shelf-row-1")["port"] == sim.endpoint("shelf-row-2")["port"]
    assert sim.endpoint("shelf-row-2")["unit_id"] == 2
    assert sim.endpoint("sst-1-meter")["port"] != sim.endpoint("shelf-row-1")["port"]


def test_mbpoll_reads_a_rectifier_shelfs_input_power(sim: SimProcess) -> None:
    ep = sim.endpoint("shelf-row-2")
    address = load_modbus_map("generic-hvdc-rectifier-800v").points["input_power_w"].address

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= 1e-5 * abs(b) + 0.1  # mbpoll prints 6 significant digits

    before, tool, after = bracketed(
        lambda: mbpoll_float(ep, address),
        lambda: sim.plant_value("shelf-row-2", "input_power_w"),
        close,
    )
    assert tool > 10_000  # 32 GPU servers plus converter losses: tens of kW
    assert close(tool, before) or close(tool, after), (before, tool, after)
    # The probe the endpoint list names reads too (what a user would try first).
    probe = ep["probe"]
    assert probe["type"] == "float32" and probe["order"] == "ABCD"
    assert mbpoll_float(ep, probe["address"]) > 0


def test_snmpget_reads_a_pdus_power(sim: SimProcess) -> None:
    ep = sim.endpoint("pdu-row-1-rack-3")
    oid = ep["probe"]["oid"]

    def read_raw() -> float:
        out = snmpget(ep, oid)
        assert out.returncode == 0, out.stderr
        return float(out.stdout.strip())

    def plant_raw() -> float:
        return sim.plant_value("pdu-row-1-rack-3", "power_w") / 10  # rPDU2: 0.01 kW

    before, tool, after = bracketed(read_raw, plant_raw, lambda a, b: abs(a - b) <= 0.5)
    assert tool > 500  # over 5 kW: four GPU servers
    assert min(abs(tool - before), abs(tool - after)) <= 0.5, (before, tool, after)


def test_a_fault_silences_one_device_only(sim: SimProcess) -> None:
    pdu1, pdu2 = sim.endpoint("pdu-row-2-rack-1"), sim.endpoint("pdu-row-2-rack-2")
    shelf1, shelf2 = sim.endpoint("shelf-row-1"), sim.endpoint("shelf-row-2")
    oid = pdu1["probe"]["oid"]
    address = shelf1["probe"]["address"]
    try:
        sim.call("PUT", "/v1/faults/pdu-row-2-rack-1", {"kind": "timeout"})
        sim.call("PUT", "/v1/faults/shelf-row-1", {"kind": "timeout"})
        assert set(sim.call("GET", "/v1/faults")) == {"pdu-row-2-rack-1", "shelf-row-1"}

        silent = snmpget(pdu1, oid)
        assert silent.returncode != 0 and "Timeout" in silent.stderr + silent.stdout
        answering = snmpget(pdu2, oid)
        assert answering.returncode == 0 and float(answering.stdout) > 0

        # Same gateway port: unit 1 times out, unit 2 answers on the very same port.
        dropped = run_tool(
            [
                require_tool("mbpoll"),
                "-m",
                "tcp",
                "-a",
                "1",
                "-0",
                "-r",
                str(address),
                "-c",
                "1",
                "-t",
                "4:float",
                "-B",
                "-1",
                "-o",
                "0.5",
                "-p",
                str(shelf1["port"]),
                shelf1["host"],
            ]
        )
        assert dropped.returncode != 0 and "timed out" in dropped.stderr.lower()
        assert mbpoll_float(shelf2, address) > 0
    finally:
        sim.call("DELETE", "/v1/faults")
    assert sim.call("GET", "/v1/faults") == {}
    back = snmpget(pdu1, oid)
    assert back.returncode == 0 and float(back.stdout) > 0
    assert mbpoll_float(shelf1, address) > 0


def test_control_channel_moves_the_plant(sim: SimProcess) -> None:
    state = sim.call("GET", "/v1/state")
    for _ in range(50):  # run alone, this test may come before the first 100 ms step
        if state["t_s"] > 0:
            break
        time.sleep(0.1)
        state = sim.call("GET", "/v1/state")
    assert state["t_s"] > 0 and state["feed_power_w"] > 0 and state["jobs"] >= 1
    sim.call("POST", "/v1/load-step", {"scale": 0.0})
    try:
        time.sleep(0.6)  # the demand is gone at the next 100 ms step; GPUs settle fast
        low = sim.plant_value("pdu-row-1-rack-1", "power_w")
        assert 4 * 2000 < low < 4 * 2000 / 0.9  # four baselines and the PSU shelf's losses
    finally:
        sim.call("POST", "/v1/load-step", {"scale": 1.0})
    # Load no cap reaches, at a rack: its PDU shows it to snmpget (rPDU2 counts 0.01 kW).
    pdu = sim.endpoint("pdu-row-1-rack-1")

    def pdu_w() -> float:
        out = snmpget(pdu, pdu["probe"]["oid"])
        assert out.returncode == 0, out.stderr
        return float(out.stdout.strip()) * 10

    before = pdu_w()
    sim.call("PUT", "/v1/extra-load/row-1-rack-1", {"power_w": 5000})
    try:
        assert sim.call("GET", "/v1/state")["extra_load_w"] == {"row-1-rack-1": 5000}
        time.sleep(0.6)
        assert pdu_w() > before + 4000
    finally:
        sim.call("DELETE", "/v1/extra-load/row-1-rack-1")
    assert sim.call("GET", "/v1/state")["extra_load_w"] == {}
    for bad_node, body, code in (
        ("no-such-rack", {"power_w": 1}, 404),
        ("row-1-rack-1", {"power_w": -1}, 422),
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            sim.call("PUT", f"/v1/extra-load/{bad_node}", body)
        assert err.value.code == code
    with pytest.raises(urllib.error.HTTPError) as err:
        sim.call("PUT", "/v1/faults/no-such-device", {"kind": "timeout"})
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        sim.call("PUT", "/v1/faults/pdu-row-1-rack-1", {"kind": "melted"})
    assert err.value.code == 422


def test_bad_config_exits_2_with_the_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("envelope_w: 23400", "envelope_w: 99999"))
    out = run_tool([*sim_command(), "--config", str(bad), "--ephemeral-ports"], 60)
    assert out.returncode == 2
    assert "envelope_w" in out.stderr and str(bad) in out.stderr


# -- the same runtime in-process, as the demo uses it -----------------------------------


async def test_in_process_runtime_serves_our_own_drivers() -> None:
    """``async with SimRuntime(..., ephemeral=True)``; our Modbus and SNMP drivers poll
    it at the addresses of :meth:`SimRuntime.served_site` and read the plant's values."""
    site = load_site(DEMO)
    async with SimRuntime(site, seed=2, ephemeral=True) as sim:
        served = sim.served_site()
        params = {p.device_id: p for p in polled_device_params(served.devices)}
        ports = {e["device"]: e["port"] for e in sim.endpoints()}
        assert params["shelf-row-2"].port == ports["shelf-row-2"]
        shelf = build_modbus_devices([params["shelf-row-2"]])[0]
        pdu = build_snmp_devices([params["pdu-row-2-rack-4"]])[0]
        await shelf.connect()
        await pdu.connect()
        try:
            for device, point, reader, tol in (
                ("shelf-row-2", "input_power_w", shelf, 0.05),
                ("pdu-row-2-rack-4", "power_w", pdu, 10.0),  # 0.01 kW resolution
            ):
                before = sim.value(device, point)
                readings = {r.point: r for r in await reader.read()}
                after = sim.value(device, point)
                assert before is not None and after is not None
                # Every point the driver polls decodes as good: derived values are sane.
                bad = {n: r.error for n, r in readings.items() if r.quality is not Quality.GOOD}
                assert not bad, bad
                value = readings[point].value
                assert min(abs(value - before), abs(value - after)) <= tol, (before, value)
        finally:
            await shelf.close()
            await pdu.close()


async def test_a_taken_port_is_an_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        data = tiny_site()
        data["devices"][0]["address"] = f"127.0.0.1:{port}"
        sim = SimRuntime(parse_site(data, "tiny"), seed=1)
        with pytest.raises(OSError, match=f"Modbus port.*{port}"):
            await sim.start()
        assert sim.modbus == [] and sim.snmp == []
        # The same site on an offset (or ephemeral) port starts.
        async with SimRuntime(parse_site(data, "tiny"), seed=1, ephemeral=True) as ok:
            assert {e["port"] for e in ok.endpoints()}.isdisjoint({port, 0})
