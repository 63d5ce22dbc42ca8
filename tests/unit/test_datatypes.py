"""The device-map Literals name exactly what the data-type table holds.

The map models spell the type names as ``Literal``s (so pydantic refuses a typo with the
list of legal names, and mypy checks the code that switches on them); the table in
drivers/datatypes.py is what decodes. A type added to one and not the other would either
be refused by every map or accepted and then fail to decode at 3 am: this test fails first.
"""

from __future__ import annotations

from typing import get_args

from drivers import datatypes, devicemap


def test_modbus_type_names_match_the_table() -> None:
    assert set(get_args(devicemap.ModbusTypeName)) == set(datatypes.MODBUS_TYPES)


def test_snmp_type_names_match_the_table() -> None:
    assert set(get_args(devicemap.SnmpTypeName)) == set(datatypes.SNMP_TYPES)


def test_word_orders_and_tables_match_the_table() -> None:
    assert get_args(devicemap.WordOrder) == datatypes.WORD_ORDERS
    tables = set(get_args(devicemap.Table))
    assert tables == datatypes.BIT_TABLES | datatypes.REGISTER_TABLES
    assert not datatypes.BIT_TABLES & datatypes.REGISTER_TABLES
