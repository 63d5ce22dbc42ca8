"""The plant as a :class:`~sim.values.PointSource`: what the simulated hardware serves.

Every frontend (Modbus server, SNMP agent, fake NVML) asks ``value(device, point)`` per
request. The answer must be the plant's, through the site's own wiring:

* a point a tree node meters (``meters: [{device, point}]``) serves that node's measured
  power, its INPUT power as the plant defines it; a meter of a feed source (A/B) serves
  the source's share;
* every other numeric point of the device's map gets a value derived from the device's
  *home* node (the converter it belongs to), so real tools see a coherent device:
  output power, nominal voltages, currents = power / voltage, efficiency, temperatures
  rising with load, integrated energy counters, module counts, status and alarm words
  (alarm bits follow plant trips and dark feeds);
* GPU ids ``<node>-g<k>`` serve ``power_w`` (instantaneous), ``power_avg_w`` (1 s),
  ``energy_j`` and ``limit_w`` for the fake NVML, and a write of ``limit_w`` becomes the
  plant's limit request for that GPU.

Reads are per request, so the (device, point) -> (array, index, transform) table is
built once; a read is a dict lookup and a multiply-add. :meth:`PlantSource.update` takes
each new plant state and refreshes a handful of per-node arrays (load, efficiency,
energy, alarms) in vector operations.

Voltages are nominal by name: MV input 13.8 kV, the 800 V DC bus, AC phase voltage
230 V (a 400 V three-phase supply, so per-phase current x voltage = per-phase power),
54 V rack DC. A value derived for a point is in the map's unit for it (W, kW, A, V, %,
degC, Wh, kWh, J); the frontends encode it with the map's scale like any other value.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model.config import Site
from drivers.devicemap import ModbusMap, ModbusPoint, SnmpMap, SnmpPoint, load_map
from sim.plant import Plant, PlantState

FloatArray = npt.NDArray[np.float64]
Point = ModbusPoint | SnmpPoint

MV_V = 13_800.0  # medium-voltage line-to-line
DC_BUS_V = 800.0
AC_PHASE_V = 230.0  # line-to-neutral of a 400 V supply
RACK_DC_V = 54.0
PFC_BULK_V = 400.0
FREQUENCY_HZ = 50.0
POWER_FACTOR = 0.98
DEFAULT_MODULES = 12

#: Plant state of a subject for status/alarm words: index into a binding's table.
OK, DARK, TRIPPED = 0, 1, 2
DARK_BITS = frozenset(
    {"ac_fail", "mv_undervoltage", "dc_undervoltage", "phase_loss", "mv_phase_loss", "input_fail"}
)
TRIP_BITS = frozenset({"breaker_open", "dc_overcurrent", "overcurrent", "over_current", "fault"})

POWER_UNITS = {"W": 1.0, "kW": 1e-3, "MW": 1e-6, "VA": 1.0, "kVA": 1e-3}
ENERGY_UNITS = {"J": 1.0, "kJ": 1e-3, "Wh": 1 / 3600, "kWh": 1 / 3.6e6, "MWh": 1 / 3.6e9}
CURRENT_UNITS = {"A": 1.0, "mA": 1e3, "kA": 1e-3}
VOLTAGE_UNITS = {"V": 1.0, "kV": 1e-3, "mV": 1e3}
PHASE_RE = re.compile(r"(?:^|_)(?:l|phase_?)([1-3])(?:_|$)")
MODULE_CURRENT_RE = re.compile(r"^module_\d+_current")
#: GPU point -> live array; GPUs are looked up by id, not tabled (a hall has 70,000).
GPU_ARRAYS = {
    "power_w": "gpu_power",
    "power_avg_w": "gpu_avg",
    "energy_j": "gpu_energy",
    "limit_w": "gpu_limit",
}


@dataclass(frozen=True, slots=True)
class Binding:
    """Where a point's value comes from: ``live[array][index] * scale + offset``, or, with
    a ``table``, ``table[int(live[array][index])]`` (status words by plant state)."""

    array: str
    index: int
    scale: float = 1.0
    offset: float = 0.0
    table: tuple[float, ...] | None = None


def _const(value: float) -> Binding:
    return Binding("one", 0, 0.0, value)


@dataclass(frozen=True)
class _Subject:
    """The node (or feed source) a device's derived points describe."""

    prefix: str  # "node", "source" or "zero" (a device that meters nothing)
    index: int
    kind: str  # tree kind, "source" or ""


@dataclass(frozen=True)
class _MapFacts:
    """What a map's point names say about the device: AC or DC sides, phases, modules."""

    phases: int
    modules: int
    v_in: float
    v_out: float
    v_none: float


def _side(name: str) -> str:
    if "output" in name or "injected" in name:
        return "out"
    if "input" in name or "absorbed" in name:
        return "in"
    return ""


def _voltage_nominal(
    name: str, vmax: float | None, kind: str, input_ac: bool, output_ac: bool
) -> float:
    """Nominal volts a point of this name reads on the home node's kind."""
    side = _side(name)
    if "mv" in name.split("_"):
        v = MV_V
    elif "bulk" in name:
        v = PFC_BULK_V
    elif "dc" in name.split("_") or "bus" in name:
        v = DC_BUS_V
    elif side == "out":
        if vmax is not None and vmax < 100:
            v = RACK_DC_V
        elif output_ac:
            v = AC_PHASE_V
        else:
            v = DC_BUS_V
    elif input_ac:
        v = AC_PHASE_V
    elif kind in ("feed", "source") and (vmax is None or vmax >= MV_V):
        v = MV_V
    elif vmax is not None and vmax < 100:
        v = RACK_DC_V
    else:
        v = DC_BUS_V
    if vmax is not None and v > vmax:
        v = vmax * 0.9
    return v


def _map_facts(points: Mapping[str, Point], kind: str) -> _MapFacts:
    names = list(points)
    phases = {m.group(1) for n in names if (m := PHASE_RE.search(n))}
    modules = sum(1 for n in names if MODULE_CURRENT_RE.match(n))
    output_ac = any("output" in n and "frequency" in n for n in names)
    # An AC output (a UPS) comes from an AC input: DC-to-AC inverters do not meter racks.
    input_ac = (
        bool(phases)
        or output_ac
        or any(
            ("frequency" in n and "output" not in n) or "power_factor" in n or "apparent" in n
            for n in names
        )
    )

    def side_v(side: str, fallback: str) -> float:
        for n, p in points.items():
            if p.unit in VOLTAGE_UNITS and _side(n) == side and "mv" not in n.split("_"):
                return _voltage_nominal(n, p.max, kind, input_ac, output_ac)
        return _voltage_nominal(fallback, None, kind, input_ac, output_ac)

    return _MapFacts(
        phases=max(len(phases), 1),
        modules=modules or DEFAULT_MODULES,
        v_in=side_v("in", "input_voltage_v"),
        v_out=side_v("out", "output_voltage_v"),
        v_none=side_v("", "voltage_v"),
    )


def _bits(point: Point, names: frozenset[str]) -> float:
    bits = getattr(point, "bits", {})
    return float(sum(1 << b for b, n in bits.items() if n in names))


def derive(
    name: str, point: Point, subject: _Subject, facts: _MapFacts, rating_w: float = 0.0
) -> Binding | None:
    """How to serve a point nobody meters; None leaves it to the map (sim_value) or 0.

    ``rating_w`` is the home node's rating: a writable current limit starts at the rated
    output current, as a shelf ships."""
    if point.sim_value is not None or getattr(point, "type", "") == "string":
        return None
    p = subject.prefix
    i = subject.index
    unit = point.unit
    side = _side(name)
    per_phase = PHASE_RE.search(name) is not None
    ptype = getattr(point, "type", "")

    if ptype == "bit":
        if name.endswith("_ok"):
            return Binding(f"{p}_state", i, table=(1.0, 0.0, 0.0))
        if any(w in name for w in ("fault", "fail", "alarm")):
            return Binding(f"{p}_state", i, table=(0.0, 1.0, 1.0))
        return _const(1.0 if point.writable or "enable" in name else 0.0)
    if ptype == "bitfield":
        if "alarm" in name:
            return Binding(
                f"{p}_state", i, table=(0.0, _bits(point, DARK_BITS), _bits(point, TRIP_BITS))
            )
        fault = _bits(point, frozenset({"fault"}))
        return Binding(f"{p}_state", i, table=(0.0, 0.0, fault))
    if point.writable:
        if unit in CURRENT_UNITS and "limit" in name:
            rated_a = rating_w / facts.v_out * CURRENT_UNITS[unit]
            return _const(_clamp(rated_a, point))
        if unit in VOLTAGE_UNITS:
            v = _voltage_nominal(name, point.max, subject.kind, True, False)
            return _const(_clamp(v, point))
        return _const(_clamp(point.max if point.max is not None else 0.0, point))

    if unit in POWER_UNITS:
        scale = POWER_UNITS[unit] / (facts.phases if per_phase else 1)
        if "apparent" in name or unit.endswith("VA"):
            scale /= POWER_FACTOR
        if "peak" in name:
            return Binding(f"{p}_peak", i, scale)
        return Binding(f"{p}_out" if side == "out" else f"{p}_in", i, scale)
    if unit in ENERGY_UNITS:
        return Binding(f"{p}_e_out" if side == "out" else f"{p}_e_in", i, ENERGY_UNITS[unit])
    if unit in CURRENT_UNITS:
        k = CURRENT_UNITS[unit]
        if MODULE_CURRENT_RE.match(name):
            return Binding(f"{p}_out", i, k / (facts.v_out * facts.modules))
        if side == "out" or "share" in name:
            return Binding(f"{p}_out", i, k / facts.v_out)
        if "mv" in name.split("_"):
            return Binding(f"{p}_in", i, k / (math.sqrt(3) * MV_V))
        if side == "in":
            return Binding(f"{p}_in", i, k / ((facts.phases if per_phase else 1) * facts.v_in))
        return Binding(f"{p}_in", i, k / facts.v_none)
    if unit in VOLTAGE_UNITS:
        v = {"in": facts.v_in, "out": facts.v_out}.get(side, facts.v_none)
        if "mv" in name.split("_") or "bulk" in name or "dc" in name.split("_"):
            v = _voltage_nominal(name, point.max, subject.kind, False, False)
        return _const(v * VOLTAGE_UNITS[unit])
    if unit == "%":
        if "efficiency" in name:
            return Binding(f"{p}_eff", i)
        if "load" in name:
            return Binding(f"{p}_load", i, 100.0)
        return None
    if unit in ("degC", "C", "celsius"):
        if "ambient" in name or "inlet" in name:
            return Binding(f"{p}_load", i, 2.0, 24.0)
        if "outlet" in name:
            return Binding(f"{p}_load", i, 17.0, 28.0)
        if any(w in name for w in ("hotspot", "semiconductor", "max", "junction")):
            return Binding(f"{p}_load", i, 45.0, 35.0)
        if "transformer" in name:
            return Binding(f"{p}_load", i, 50.0, 30.0)
        return Binding(f"{p}_load", i, 20.0, 25.0)
    if unit == "Hz":
        return _const(FREQUENCY_HZ)
    if unit == "rpm":
        return Binding(f"{p}_load", i, 7000.0, 5000.0)
    if unit == "s" and "up_time" in name.replace("uptime", "up_time"):
        return Binding("uptime", 0)
    if "power_factor" in name:
        return _const(POWER_FACTOR)
    if name == "module_count":
        return _const(float(facts.modules))
    if name == "modules_online":
        n = float(facts.modules)
        return Binding(f"{p}_state", i, table=(n, 0.0, 0.0))
    return None


def _clamp(value: float, point: Point) -> float:
    if point.min is not None:
        value = max(value, point.min)
    if point.max is not None:
        value = min(value, point.max)
    return value


class PlantSource:
    """Serves a live :class:`~sim.plant.PlantState` through the site's meters and maps.

    Call :meth:`update` with every new state (the runtime does, each step). Reads and
    ``limit_w`` writes may come from other threads (the fake NVML runs in the driver's
    thread): reads see whole arrays swapped in by :meth:`update`; writes land in
    :attr:`limit_request_w` and bump :attr:`limit_generation` under a lock.
    """

    def __init__(
        self,
        site: Site,
        plant: Plant,
        state: PlantState | None = None,
        *,
        maps: Mapping[str, ModbusMap | SnmpMap] | None = None,
    ) -> None:
        self.site = site
        self.plant = plant
        tree = plant.tree
        self._node_rating = np.array(
            [tree.node(n).rating_w for n in plant.node_ids], dtype=np.float64
        )
        sources = {s.id: s for n in site.nodes for s in n.sources}
        self._source_rating = np.array(
            [sources[s].rating_w for s in plant.source_ids], dtype=np.float64
        )
        self._lock = threading.Lock()
        self.limit_request_w: FloatArray = plant.gpu_default_w.copy()
        self.limit_generation = 0
        self._written: dict[tuple[str, str], float] = {}
        self._gpu_index = dict(tree.gpu_index)
        self.table: dict[tuple[str, str], Binding] = {}
        self._writable: set[tuple[str, str]] = set()
        self._build(maps or {})
        n_n, n_s, n_g = plant.n_nodes, len(plant.source_ids), plant.n_gpus
        self._e = {
            "node_e_in": np.zeros(n_n),
            "node_e_out": np.zeros(n_n),
            "source_e_in": np.zeros(n_s),
            "gpu_energy": np.zeros(n_g),
        }
        self._peak = {"node": np.zeros(n_n), "source": np.zeros(n_s)}
        self._t_s: float | None = None
        self.live: dict[str, FloatArray] = {}
        self.update(state if state is not None else plant.initial_state())

    # -- the table -------------------------------------------------------------------

    def _subjects(self) -> tuple[dict[tuple[str, str], _Subject], dict[str, _Subject]]:
        """Meter bindings, and each device's home: the converter it belongs to."""
        plant = self.plant
        metered: dict[tuple[str, str], _Subject] = {}
        by_device: dict[str, list[tuple[str, _Subject]]] = {}
        for n in self.site.nodes:
            if n.kind == "gpu":
                continue
            subject = _Subject("node", plant.node_index[n.id], n.kind)
            for m in n.meters:
                metered[(m.device, m.point)] = subject  # later (deeper) nodes win
                by_device.setdefault(m.device, []).append((m.point, subject))
            for src in n.sources:
                s_subject = _Subject("source", plant.source_index[src.id], "source")
                for m in src.meters:
                    metered[(m.device, m.point)] = s_subject
                    by_device.setdefault(m.device, []).append((m.point, s_subject))
        homes: dict[str, _Subject] = {}
        for device, uses in by_device.items():
            inputs = [s for point, s in uses if _side(point) != "out"] or [s for _, s in uses]
            converters = [s for s in inputs if s.kind in ("sst", "row", "rack")]
            homes[device] = (converters or inputs)[-1]
        return metered, homes

    def _build(self, maps: Mapping[str, ModbusMap | SnmpMap]) -> None:
        metered, homes = self._subjects()
        for dev in self.site.devices:
            if dev.driver not in ("modbus", "snmp") or not dev.map:
                continue
            dmap = maps.get(dev.map) or load_map(dev.map)
            home = homes.get(dev.id, _Subject("zero", 0, ""))
            points: Mapping[str, Point] = dmap.points
            facts = _map_facts(points, home.kind)
            for name, point in points.items():
                key = (dev.id, name)
                if point.writable:
                    self._writable.add(key)
                subject = metered.get(key)
                if subject is not None:
                    self.table[key] = Binding(
                        f"{subject.prefix}_in", subject.index, POWER_UNITS.get(point.unit, 1.0)
                    )
                    continue
                binding = derive(name, point, home, facts, self._rating(home))
                if binding is not None:
                    self.table[key] = binding

    def _rating(self, subject: _Subject) -> float:
        if subject.prefix == "node":
            return float(self._node_rating[subject.index])
        if subject.prefix == "source":
            return float(self._source_rating[subject.index])
        return 0.0

    # -- live state ------------------------------------------------------------------

    @property
    def state(self) -> PlantState:
        return self._state

    def update(self, state: PlantState) -> None:
        """Take a new plant state: integrate energy, track peaks, refresh derived arrays."""
        dt = 0.0 if self._t_s is None else max(state.t_s - self._t_s, 0.0)
        self._t_s = state.t_s
        self._state = state
        plant = self.plant
        n_in, n_out, s_in = state.node_power_w, state.node_output_w, state.source_power_w
        e = self._e
        if dt > 0:
            e["node_e_in"] = e["node_e_in"] + n_in * dt
            e["node_e_out"] = e["node_e_out"] + n_out * dt
            e["source_e_in"] = e["source_e_in"] + s_in * dt
            e["gpu_energy"] = e["gpu_energy"] + state.gpu_power_w * dt
        self._peak["node"] = np.maximum(self._peak["node"], n_in)
        self._peak["source"] = np.maximum(self._peak["source"], s_in)
        n_nodes = plant.n_nodes
        node_state = np.where(
            state.tripped[:n_nodes], float(TRIPPED), np.where(state.dark_node, float(DARK), 0.0)
        )
        src_tripped = state.tripped[n_nodes:]
        src_lost = np.array([s in state.lost_sources for s in plant.source_ids], dtype=bool)
        source_state = np.where(src_tripped, float(TRIPPED), np.where(src_lost, float(DARK), 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            eff = np.where(n_in > 1.0, n_out / n_in * 100.0, 0.0)
        zero = np.zeros(1)
        self.live = {
            "one": np.ones(1),
            "uptime": np.array([state.t_s]),
            "node_in": n_in,
            "node_out": n_out,
            "node_peak": self._peak["node"],
            "node_load": n_in / self._node_rating,
            "node_eff": eff,
            "node_e_in": e["node_e_in"],
            "node_e_out": e["node_e_out"],
            "node_state": node_state,
            "source_in": s_in,
            "source_out": s_in,
            "source_peak": self._peak["source"],
            "source_load": s_in / self._source_rating if len(s_in) else s_in,
            "source_eff": np.where(s_in > 1.0, 100.0, 0.0),
            "source_e_in": e["source_e_in"],
            "source_e_out": e["source_e_in"],
            "source_state": source_state,
            "zero_in": zero,
            "zero_out": zero,
            "zero_peak": zero,
            "zero_load": zero,
            "zero_eff": zero,
            "zero_e_in": zero,
            "zero_e_out": zero,
            "zero_state": zero,
            "gpu_power": state.gpu_power_w,
            "gpu_avg": state.gpu_power_1s_w,
            "gpu_energy": e["gpu_energy"],
            "gpu_limit": state.gpu_limit_w,
        }

    # -- PointSource ---------------------------------------------------------------------

    def value(self, device_id: str, point: str) -> float | None:
        key = (device_id, point)
        written = self._written.get(key)
        if written is not None:
            return written
        b = self.table.get(key)
        if b is None:
            g = self._gpu_index.get(device_id)
            array = GPU_ARRAYS.get(point)
            if g is None or array is None:
                return None
            return float(self.live[array][g])
        x = float(self.live[b.array][b.index])
        if b.table is not None:
            return b.table[int(x)]
        return x * b.scale + b.offset

    def write(self, device_id: str, point: str, value: float) -> bool:
        if point == "limit_w":
            g = self._gpu_index.get(device_id)
            if g is None or not math.isfinite(value):
                return False
            with self._lock:
                self.limit_request_w[g] = value
                self.limit_generation += 1
            return True
        key = (device_id, point)
        if key not in self._writable:
            return False
        self._written[key] = float(value)  # held, like a device's setpoint register
        return True

    def take_limits(self, seen_generation: int) -> tuple[int, FloatArray | None]:
        """A copy of the limit requests if any arrived since ``seen_generation``."""
        with self._lock:
            if self.limit_generation == seen_generation:
                return seen_generation, None
            return self.limit_generation, self.limit_request_w.copy()

    def points(self, device_id: str) -> dict[str, float | None]:
        """Every served value of a device, for the control channel and tests."""
        if device_id in self._gpu_index:
            return {p: self.value(device_id, p) for p in GPU_ARRAYS}
        return {p: self.value(d, p) for d, p in self.table if d == device_id}
