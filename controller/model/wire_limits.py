"""Bounds that the site config and the agent link share, so both check the same numbers.

They live in the model, not in :mod:`controller.agentlink.lease`, because the config
(an agent id, a lease length) is checked against them before any link exists.
"""

from __future__ import annotations

# Ids travel as MQTT topic levels: no '/', '+', '#', spaces.
ID_PATTERN = r"^[A-Za-z0-9_.:-]+$"
MAX_LEASE_S = 3600.0
