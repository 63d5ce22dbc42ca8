"""Policies by the name an operator writes in ``policy.name`` or passes to ``--policy``.

An explicit dict, not import-by-name: the set of policies is part of the product.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .baselines import none_policy, static_policy, three_band_policy
from .rackpower import decide
from .types import Policy

POLICIES: Mapping[str, Policy] = MappingProxyType(
    {
        "rackpower": decide,
        "none": none_policy,
        "static": static_policy,
        "three-band": three_band_policy,
    }
)


def get_policy(name: str) -> Policy:
    """The policy called ``name``; ``KeyError`` lists the known names."""
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})") from None
