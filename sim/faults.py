"""Faults the simulator's hardware frontends can be told to show, per device.

Shared by the Modbus, SNMP and NVML frontends so a scenario (or a test, or an operator at
run time) switches a fault on for one device and every protocol shows it the same way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FaultKind(enum.Enum):
    DELAY = "delay"  # answer, but late by ``delay_s`` (keep below the client's timeout)
    TIMEOUT = "timeout"  # never answer: the request is dropped
    EXCEPTION = "exception"  # answer with a protocol error (Modbus exception code, SNMP genErr)
    GARBAGE = "garbage"  # answer with nonsense (NaN, all-ones, out of range)
    GONE = "gone"  # the device vanished: connection refused / no such unit or community


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    delay_s: float = 0.0
    exception_code: int = 4  # Modbus SLAVE_DEVICE_FAILURE; SNMP frontends map it to genErr


class FaultTable:
    """Current fault per device id; absent means healthy. Not thread-safe: one event loop."""

    def __init__(self) -> None:
        self._faults: dict[str, Fault] = {}

    def set(self, device_id: str, fault: Fault | None) -> None:
        if fault is None:
            self._faults.pop(device_id, None)
        else:
            self._faults[device_id] = fault

    def get(self, device_id: str) -> Fault | None:
        return self._faults.get(device_id)

    def clear(self) -> None:
        self._faults.clear()

    def active(self) -> dict[str, Fault]:
        return dict(self._faults)
