"""collectd as the peer in the poll benchmark: its config for our fleet, and its CPU.

collectd (Debian ``collectd-core``) is what many sites already run to poll meters: the
``modbus`` plugin (libmodbus) and the ``snmp`` plugin (net-snmp). We configure it the way
its manual shows, generated from the same device maps our drivers read: one ``Data``
block per point, one ``Host`` block per endpoint (a Modbus gateway with a ``Slave`` per
unit, an SNMP PDU), ``Interval 1``, and no write plugin, so that what collectd spends is
polling and decoding only (the simulator counts the points it serves). Points collectd
cannot express are left out and the benchmark says how many it polls per device:
coils and discrete inputs (the modbus plugin reads holding and input registers only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drivers.devicemap import ModbusMap, ModbusPoint, SnmpMap

PLUGIN_DIR = Path("/usr/lib/collectd")
TYPES_DB = Path("/usr/share/collectd/types.db")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# map type (+ word order) -> the modbus plugin's RegisterType; anything else is skipped.
_REGISTER_TYPES = {
    ("int16", "ABCD"): "Int16",
    ("uint16", "ABCD"): "Uint16",
    ("bitfield", "ABCD"): "Uint16",
    ("int32", "ABCD"): "Int32",
    ("uint32", "ABCD"): "Uint32",
    ("float32", "ABCD"): "Float",
    ("int32", "CDAB"): "Int32LE",
    ("uint32", "CDAB"): "Uint32LE",
    ("float32", "CDAB"): "FloatLE",
    ("int64", "ABCD"): "Int64",
    ("uint64", "ABCD"): "UInt64",
}


def missing() -> str | None:
    """Why collectd cannot run here, or None."""
    if shutil.which("collectd") is None and not Path("/usr/sbin/collectd").exists():
        return "collectd not installed (apt-get install collectd-core)"
    for plugin in ("modbus", "snmp"):
        if not (PLUGIN_DIR / f"{plugin}.so").exists():
            return f"collectd plugin {PLUGIN_DIR / plugin}.so missing"
    return None


def _register_type(p: ModbusPoint) -> str | None:
    if p.table not in ("holding", "input") or (p.type == "bitfield" and p.length != 1):
        return None
    return _REGISTER_TYPES.get((p.type, p.order))


def modbus_points(dmap: ModbusMap) -> dict[str, ModbusPoint]:
    """The map's points collectd's modbus plugin can read."""
    return {n: p for n, p in dmap.numeric_points().items() if _register_type(p) is not None}


def snmp_points(smap: SnmpMap) -> dict[str, Any]:
    """Every point of an SNMP map without decimal digits from another OID (APC's have none)."""
    return {
        n: p for n, p in smap.points.items() if p.divisor_oid is None and p.si_scale_oid is None
    }


def _q(text: object) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def modbus_block(dmap: ModbusMap, endpoints: Sequence[dict[str, Any]]) -> str:
    """``<Plugin modbus>``: a Data block per point, a Host per gateway, a Slave per unit."""
    points = modbus_points(dmap)
    lines = ["<Plugin modbus>"]
    for name, p in points.items():
        lines += [
            f"  <Data {_q(name)}>",
            f"    RegisterBase {p.address}",
            f"    RegisterType {_register_type(p)}",
            f"    RegisterCmd {'ReadInput' if p.table == 'input' else 'ReadHolding'}",
            '    Type "gauge"',
            f"    Instance {_q(name)}",
            f"    Scale {p.scale!r}",
            f"    Shift {p.offset!r}",
            "  </Data>",
        ]
    by_port: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for e in endpoints:
        by_port.setdefault((str(e["host"]), int(e["port"])), []).append(e)
    for k, ((host, port), units) in enumerate(sorted(by_port.items())):
        lines += [
            f'  <Host "gw-{k}">',
            f"    Address {_q(host)}",
            f"    Port {_q(port)}",
            "    Interval 1",
        ]
        for e in units:
            lines += [f"    <Slave {int(e['unit_id'])}>", f"      Instance {_q(e['device'])}"]
            lines += [f"      Collect {_q(n)}" for n in points]
            lines.append("    </Slave>")
        lines.append("  </Host>")
    lines.append("</Plugin>")
    return "\n".join(lines)


def snmp_block(smap: SnmpMap, endpoints: Sequence[dict[str, Any]], timeout_s: float) -> str:
    """``<Plugin snmp>``: a scalar (Table false) Data block per point, a Host per PDU."""
    points = snmp_points(smap)
    lines = ["<Plugin snmp>"]
    for name, p in points.items():
        lines += [
            f"  <Data {_q(name)}>",
            "    Table false",
            '    Type "gauge"',
            f"    TypeInstance {_q(name)}",
            f"    Values {_q(p.full_oid)}",
            f"    Scale {p.scale!r}",
            f"    Shift {p.offset!r}",
            "  </Data>",
        ]
    collect = " ".join(_q(n) for n in points)
    for e in endpoints:
        address = f"{e['host']}:{e['port']}"
        lines += [
            f"  <Host {_q(e['device'])}>",
            f"    Address {_q(address)}",
            "    Version 2",
            f"    Community {_q(e['community'])}",
            f"    Collect {collect}",
            "    Interval 1",
            f"    Timeout {max(1, round(timeout_s))}",
            "    Retries 0",
            "  </Host>",
        ]
    lines.append("</Plugin>")
    return "\n".join(lines)


def config(workdir: Path, plugin: str, block: str, read_threads: int) -> str:
    """A private collectd.conf: nothing from /etc, logs to stderr, no write plugin.

    Values end in a PostCache chain whose only target is ``stop``: without it collectd
    would complain, per value, that no write plugin is loaded."""
    return "\n".join(
        [
            'Hostname "rackpower-bench"',
            "FQDNLookup false",
            f"BaseDir {_q(workdir)}",
            f"PIDFile {_q(workdir / 'collectd.pid')}",
            f"PluginDir {_q(PLUGIN_DIR)}",
            f"TypesDB {_q(TYPES_DB)}",
            "Interval 1",
            f"ReadThreads {read_threads}",
            "WriteThreads 1",
            f"LoadPlugin {plugin}",
            block,
            'PostCacheChain "rackpower-bench"',
            '<Chain "rackpower-bench">',
            '  Target "stop"',
            "</Chain>",
            "",
        ]
    )


class Collectd:
    """``collectd -f -C conf`` as a child process; its CPU read from /proc."""

    def __init__(self, workdir: Path, conf_text: str) -> None:
        self.workdir = workdir
        self.conf = workdir / "collectd.conf"
        self.conf.write_text(conf_text, encoding="utf-8")
        self.log = workdir / "collectd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("collectd") or "/usr/sbin/collectd"
        check = subprocess.run(
            [exe, "-t", "-C", str(self.conf)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"collectd rejects {self.conf}: {check.stderr or check.stdout}")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, "-f", "-C", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )

    def cpu_s(self) -> float:
        """user + system CPU of collectd (all its threads) so far."""
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def problems(self, limit: int = 5) -> list[str]:
        """The first error lines collectd logged (a wrong config shows up here)."""
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").splitlines()
            return [ln for ln in lines if "error" in ln.lower() or "fail" in ln.lower()][:limit]
        return []
