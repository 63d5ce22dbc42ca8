"""Where the simulator's hardware frontends get the values they serve.

A frontend (Modbus server, SNMP agent, fake NVML) asks a :class:`PointSource` for the
current value of a device's point by the point's name in the device map, and encodes it
with the same map the drivers decode with. The plant provides the real source; tests can
use :class:`StaticSource`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class PointSource(Protocol):
    def value(self, device_id: str, point: str) -> float | None:
        """Engineering value (in the map's unit) or None if this device has no such point."""
        ...

    def write(self, device_id: str, point: str, value: float) -> bool:
        """Apply a setpoint written by a client; False if the point cannot be written."""
        ...


class StaticSource:
    """Fixed values per (device, point), writable: for tests and for serving before a plant."""

    def __init__(self, values: Mapping[tuple[str, str], float] | None = None) -> None:
        self.values: dict[tuple[str, str], float] = dict(values or {})

    def value(self, device_id: str, point: str) -> float | None:
        return self.values.get((device_id, point))

    def write(self, device_id: str, point: str, value: float) -> bool:
        if (device_id, point) not in self.values:
            return False
        self.values[(device_id, point)] = value
        return True
