"""`rackpower demo --mqtt URL --influx URL` as a process, with real Mosquitto and
VictoriaMetrics: what `make demo` shows, plus the broker and the TSDB a facility engineer
would point it at.

The demo runs the demo site (256 GPUs, 32 node agents on the simulator's fake NVML, since
there is no GPU here) with its agent link and BMS topics on the broker. The test acts as
the BMS: it sees ``online``, sends a demand response to the feed and reads the ack, then
reads the feed's envelope back from the TSDB (the limit in force) and sees ``offline``
retained once the demo has stopped by itself.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.harness import bms_client, eventually, retained_status
from tests.fixtures.mosquitto import Mosquitto
from tests.fixtures.victoriametrics import Series, VictoriaMetrics, samples

pytest_plugins = ["tests.fixtures.mosquitto", "tests.fixtures.victoriametrics"]

RACKPOWER = Path(sys.executable).parent / "rackpower"
DURATION_S = 15.0
# Between what the demo site can be shed to (115.2 kW: every GPU at its floor plus the
# baselines) and its feed's 230 kW envelope: accepted, and the envelope in force.
DR_LIMIT_W = 150_000.0


def start_demo(log_path: Path, mqtt_url: str, influx_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [
                str(RACKPOWER),
                "demo",
                "--duration",
                str(DURATION_S),
                "--api-port",
                "0",
                "--mqtt",
                mqtt_url,
                "--influx",
                influx_url,
                "--report-s",
                "2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )


async def test_demo_speaks_to_a_real_broker_and_tsdb(
    tmp_path: Path, mosquitto: Mosquitto, victoriametrics: VictoriaMetrics
) -> None:
    log_path = tmp_path / "demo.log"
    proc = start_demo(log_path, mosquitto.url, victoriametrics.url)
    try:
        async with bms_client(
            mosquitto.host, mosquitto.port, "status", "cmd/ack", site="demo"
        ) as bms:
            await eventually(lambda: b"online" in bms.on("status"), "the demo online on MQTT")
            await bms.command(
                {
                    "type": "demand_response",
                    "command_id": "demo-dr-1",
                    "node": "mv-1",
                    "limit_w": DR_LIMIT_W,
                    "ttl_s": 600,
                }
            )
            ack = await bms.ack_for("demo-dr-1")
            assert ack["status"] == "accepted", ack

        def dr_in_force(series: list[Series]) -> bool:
            env_w = samples(series, "rackpower_node_envelope_w")
            return any(v == DR_LIMIT_W for vs in env_w.values() for _, v in vs)

        match = '{__name__=~"rackpower_node_(envelope|power)_w",site="demo",node="mv-1"}'
        series = await asyncio.to_thread(victoriametrics.wait_for, match, dr_in_force, 60)
        envelope = [
            v for vs in samples(series, "rackpower_node_envelope_w").values() for _, v in vs
        ]
        assert 230_000.0 in envelope and DR_LIMIT_W in envelope, envelope  # before, then under DR
        power = [v for vs in samples(series, "rackpower_node_power_w").values() for _, v in vs]
        assert power and all(50_000 < p < 230_000 for p in power), power

        await eventually(
            lambda: proc.poll() is not None, "the demo to stop after --duration", DURATION_S + 60
        )
        out = log_path.read_text(errors="replace")
        assert proc.returncode == 0, out[-3000:]
        assert "status page  http://127.0.0.1:" in out and "trips 0" in out
        assert "Traceback" not in out, out[-3000:]
        assert await retained_status(mosquitto.host, mosquitto.port, site="demo") == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
