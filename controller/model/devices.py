"""Turn the site's device specs into driver parameters, resolving secrets at start-up.

Drivers never see the config models (they import nothing from the controller); this is
the one place that translates. Secrets (SNMP communities, v3 keys) come from the
environment, so a missing one is a start-up error naming the variable, not a silent
"public" community at 3 am.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from controller.model.config import DeviceSpec
from drivers.base import DeviceParams

DEFAULT_PORTS = {"modbus": 502, "snmp": 161}
POLLED_DRIVERS = frozenset({"modbus", "snmp"})


class DeviceSetupError(ValueError):
    """A device cannot be polled as configured (e.g. its secret is not in the environment)."""


def _secret(
    device: DeviceSpec, var: str | None, what: str, environ: Mapping[str, str]
) -> str | None:
    if var is None:
        return None
    value = environ.get(var)
    if value is None:
        raise DeviceSetupError(
            f"device {device.id!r}: {what} is to come from the environment variable {var},"
            " which is not set"
        )
    return value


def device_params(device: DeviceSpec, environ: Mapping[str, str] | None = None) -> DeviceParams:
    env = os.environ if environ is None else environ
    host, port = device.host_port(DEFAULT_PORTS.get(device.driver, 0))
    community = device.community
    if device.community_env is not None:
        community = _secret(device, device.community_env, "the SNMP community", env)
    v3_auth_key = _secret(device, device.v3_auth_key_env, "the SNMPv3 auth key", env)
    v3_priv_key = _secret(device, device.v3_priv_key_env, "the SNMPv3 privacy key", env)
    # Each driver decodes its own options (drivers.modbus.ModbusOptions, drivers.snmp.SnmpOptions).
    options: dict[str, object] = {}
    if device.driver == "modbus":
        options = {"unit_id": device.modbus_unit_id, "tls": device.tls}
    elif device.driver == "snmp":
        snmp: dict[str, str | None] = {
            "snmp_version": device.snmp_version,
            "community": community,
            "v3_user": device.v3_user,
            "v3_auth_key": v3_auth_key,
            "v3_priv_key": v3_priv_key,
        }
        options = {k: v for k, v in snmp.items() if v is not None}
    return DeviceParams(
        device_id=device.id,
        driver=device.driver,
        host=host,
        port=port,
        map_name=device.map,
        period_s=device.period_s,
        timeout_s=device.timeout_s,
        stale_s=device.effective_stale_s,
        options=options,
    )


def polled_device_params(
    devices: Sequence[DeviceSpec], environ: Mapping[str, str] | None = None
) -> list[DeviceParams]:
    """Parameters of every device the controller polls itself (Modbus and SNMP meters).

    NVML is read by the node agents, not polled from the controller.
    """
    return [device_params(d, environ) for d in devices if d.driver in POLLED_DRIVERS]
