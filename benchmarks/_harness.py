"""Shared bits of the end-to-end benchmarks (latency, scale): a private Mosquitto,
percentiles, a process's CPU and memory from /proc, and the JSON writer.

The broker is the test fixture's helper class (``tests.fixtures.mosquitto``), so the
benchmarks start Mosquitto exactly as the integration tests do: its own config and log
in a temporary directory, a free loopback port, stopped on exit. It is imported only
where a broker is started: the fixture module imports pytest, and a process whose memory
is measured (the scale benchmark's controller) must not carry it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fixtures.mosquitto import Mosquitto

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(path, os.X_OK):
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    return path


@contextlib.contextmanager
def private_mosquitto() -> Iterator[Mosquitto]:
    """An anonymous broker on a free loopback port for the length of the block."""
    from tests.fixtures.mosquitto import Mosquitto
    from tests.helpers.ports import free_port

    with tempfile.TemporaryDirectory(prefix="rackpower-bench-mqtt-") as tmp:
        broker = Mosquitto(mosquitto_binary(), Path(tmp), free_port())
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank q-quantile (0..1): with 40 samples p99 is the largest, as it should be
    (no interpolation inventing a value that was never measured)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds (user + system) and resident memory of a process at one moment."""

    cpu_s: float
    rss_bytes: int


def proc_sample(pid: int | None = None) -> ProcSample:
    """Read /proc/<pid>/stat and statm (Linux): no psutil needed."""
    where = f"/proc/{pid or 'self'}"
    stat = Path(f"{where}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    rss_pages = int(Path(f"{where}/statm").read_text().split()[1])
    return ProcSample((utime + stime) / CLOCK_TICKS, rss_pages * PAGE_BYTES)


def peak_rss_bytes(pid: int | None = None) -> int:
    """VmHWM: the high-water mark of resident memory."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
