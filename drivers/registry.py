"""Driver name (``DeviceSpec.driver``) -> factory: an explicit table, not import-by-name.

It lives apart from :mod:`drivers.base` because it names every polled driver, and every
driver builds on ``base``: kept in ``base`` it needed function-level imports to hide an
import circle. A new polled protocol adds one line here (see CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from drivers.base import DeviceParams, Pollable
from drivers.modbus import build_modbus_devices
from drivers.snmp import build_snmp_devices

DriverFactory = Callable[[Sequence[DeviceParams]], Sequence[Pollable]]

DRIVER_TYPES: dict[str, DriverFactory] = {
    "modbus": build_modbus_devices,
    "snmp": build_snmp_devices,
}


def build_pollables(devices: Sequence[DeviceParams]) -> list[Pollable]:
    """Pollables for a whole site, grouped per driver so drivers can share connections."""
    by_driver: dict[str, list[DeviceParams]] = {}
    for d in devices:
        if d.driver not in DRIVER_TYPES:
            raise ValueError(f"{d.device_id}: no driver type {d.driver!r} ({sorted(DRIVER_TYPES)})")
        by_driver.setdefault(d.driver, []).append(d)
    out: list[Pollable] = []
    for name, group in by_driver.items():
        out.extend(DRIVER_TYPES[name](group))
    return out
