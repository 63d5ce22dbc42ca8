"""Small site configs for tests, as plain dicts (what yaml.safe_load would return)."""

from __future__ import annotations

import copy
from typing import Any


def tiny_site() -> dict[str, Any]:
    """One feed, SST, bus, row, two racks of two 4-GPU nodes; racks 1.2x oversubscribed."""
    return copy.deepcopy(
        {
            "site": "tiny",
            "gpu_models": {"g": {"min_w": 100, "max_w": 500, "default_w": 500}},
            "trip_curves": {"c": {"points": [[1.1, 600], [1.5, 30]], "instant_ratio": 5}},
            "devices": [
                {
                    "id": "sst-meter",
                    "driver": "modbus",
                    "address": "127.0.0.1:15020",
                    "map": "generic-sst-mv800",
                    "period_s": 1.0,
                    "timeout_s": 0.5,
                },
                {
                    "id": "pdu-{i}",
                    "count": 2,
                    "driver": "snmp",
                    "address": "127.0.0.1:16161",
                    "community": "rack-{i}",
                    "map": "apc-rpdu2",
                },
            ],
            "feeds": [
                {
                    "id": "feed",
                    "rating_w": 20000,
                    "envelope_w": 18000,
                    "trip_curve": "c",
                    "meters": [{"device": "sst-meter", "point": "input_power_w"}],
                }
            ],
            "ssts": [{"id": "sst", "parent": "feed", "rating_w": 18000, "envelope_w": 17000}],
            "buses": [{"id": "bus", "parent": "sst", "rating_w": 17000, "envelope_w": 16000}],
            "rows": [
                {
                    "id": "row",
                    "parent": "bus",
                    "rating_w": 16000,
                    "envelope_w": 15000,
                    "racks": [
                        {
                            "id": "rack-{i}",
                            "count": 2,
                            "rating_w": 8000,
                            "envelope_w": 7000,
                            "meters": [{"device": "pdu-{rack_i}"}],
                            "nodes": [
                                {
                                    "id": "{rack}-n{i}",
                                    "count": 2,
                                    "gpus": 4,
                                    "gpu_model": "g",
                                    "baseline_w": 200,
                                }
                            ],
                        },
                    ],
                }
            ],
        }
    )


def ab_site() -> dict[str, Any]:
    """The tiny site on a redundant A/B feed."""
    site = tiny_site()
    site["feeds"] = [
        {
            "id": "feed",
            "rating_w": 20000,
            "envelope_w": 18000,
            "sources": [
                {"id": "feed-a", "rating_w": 12000, "envelope_w": 11000, "trip_curve": "c"},
                {"id": "feed-b", "rating_w": 12000, "envelope_w": 11000, "trip_curve": "c"},
            ],
        }
    ]
    return site


def agent_site(
    mqtt: dict[str, Any] | None = None, agent_auth: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The tiny site with a node agent per server (``agent-<node>``) and an MQTT section.

    Agents on MQTT need ``integrations.agent_auth`` (validation refuses them without):
    ``agent_auth`` if given, else a keys directory that a test running the link must
    create and fill (``/etc/rackpower/agent-keys``: fine for a config that is only read).
    """
    site = tiny_site()
    for r in (1, 2):  # device ids are expanded per entry: one entry per rack
        site["devices"].append(
            {
                "id": f"agent-rack-{r}-n{{i}}",
                "count": 2,
                "driver": "agent",
                "period_s": 0.5,
                "timeout_s": 0.25,
            }
        )
    node = site["rows"][0]["racks"][0]["nodes"][0]
    node["agent"] = "agent-{rack}-n{i}"
    if mqtt is not None:
        auth = agent_auth if agent_auth is not None else {"keys_dir": "/etc/rackpower/agent-keys"}
        site["integrations"] = {"mqtt": mqtt, "agent_auth": auth}
    return site


def with_rack_agents(site: dict[str, Any]) -> dict[str, Any]:
    """``site`` (a tiny_site) with a node agent on each GPU server of its first rack type.

    The nodes entry of rack 1 is a template the loader expands into every rack, so each
    server ``rack-<r>-n<i>`` gets ``agent-rack-<r>-n<i>``, declared as a rack device.
    """
    rack = site["rows"][0]["racks"][0]
    rack["devices"] = [
        {
            "id": "agent-{rack}-n{i}",
            "count": 2,
            "driver": "agent",
            "period_s": 0.5,
            "timeout_s": 0.25,
        }
    ]
    rack["nodes"][0]["agent"] = "agent-{rack}-n{i}"
    return site


def agent_config_dict(agent_id: str, node_id: str, site: str = "tiny") -> dict[str, Any]:
    """A node agent's config for an in-memory link (the MQTT url is never dialled)."""
    return {
        "site": site,
        "agent_id": agent_id,
        "node_id": node_id,
        "controller_id": "ctl",
        "failsafe_w": 300,
        "telemetry_hz": 10,
        "mqtt": {"url": "mqtt://127.0.0.1:1"},
    }
