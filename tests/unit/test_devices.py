"""Device specs -> driver parameters: addresses, unit ids, secrets from the environment."""

from __future__ import annotations

import pytest

from controller.model.config import DeviceSpec
from controller.model.devices import DeviceSetupError, device_params, polled_device_params


def test_modbus_params() -> None:
    spec = DeviceSpec(
        id="shelf",
        driver="modbus",
        address="10.0.0.5:1502",
        unit_id=7,
        map="generic-hvdc-rectifier-800v",
        period_s=0.5,
        timeout_s=0.3,
    )
    p = device_params(spec, {})
    assert (p.host, p.port, p.options["unit_id"], p.map_name) == (
        "10.0.0.5",
        1502,
        7,
        "generic-hvdc-rectifier-800v",
    )
    assert p.stale_s == pytest.approx(1.5)


def test_default_port_and_ipv6() -> None:
    spec = DeviceSpec(id="pdu", driver="snmp", address="[::1]", community="c", map="apc-rpdu2")
    p = device_params(spec, {})
    assert (p.host, p.port, p.options["community"]) == ("::1", 161, "c")


def test_secrets_come_from_the_environment() -> None:
    spec = DeviceSpec(
        id="pdu",
        driver="snmp",
        address="pdu1",
        map="apc-rpdu2",
        snmp_version="3",
        v3_user="rp",
        v3_auth_key_env="AUTH",
        v3_priv_key_env="PRIV",
        community_env="COMM",
    )
    p = device_params(spec, {"AUTH": "a" * 12, "PRIV": "p" * 12, "COMM": "secret"})
    o = p.options
    assert (o["v3_auth_key"], o["v3_priv_key"], o["community"]) == ("a" * 12, "p" * 12, "secret")
    with pytest.raises(DeviceSetupError, match="PRIV, which is not set"):
        device_params(spec, {"AUTH": "x", "COMM": "y"})


def test_agents_are_not_polled_by_the_controller() -> None:
    specs = [
        DeviceSpec(id="a", driver="agent"),
        DeviceSpec(id="m", driver="modbus", address="h:1", map="generic-sst-mv800"),
    ]
    assert [p.device_id for p in polled_device_params(specs, {})] == ["m"]


def test_each_driver_decodes_its_own_options() -> None:
    """DeviceParams has no protocol fields: the controller's options round-trip through the
    drivers' own decoders, and a wrong type is refused naming the device, not guessed."""
    from drivers.base import DeviceParams
    from drivers.modbus import ModbusOptions
    from drivers.snmp import SnmpOptions

    modbus = DeviceSpec(
        id="shelf",
        driver="modbus",
        address="10.0.0.5",
        unit_id=7,
        tls=True,
        map="generic-hvdc-rectifier-800v",
    )
    assert ModbusOptions.of(device_params(modbus, {})) == ModbusOptions(unit_id=7, tls=True)
    snmp = DeviceSpec(id="pdu", driver="snmp", address="pdu1", community="c", map="apc-rpdu2")
    assert SnmpOptions.of(device_params(snmp, {})) == SnmpOptions(community="c")
    with pytest.raises(ValueError, match="shelf: option unit_id must be an integer"):
        ModbusOptions.of(DeviceParams("shelf", "modbus", options={"unit_id": "7"}))
    with pytest.raises(ValueError, match="pdu: option community must be text"):
        SnmpOptions.of(DeviceParams("pdu", "snmp", options={"community": 7}))
