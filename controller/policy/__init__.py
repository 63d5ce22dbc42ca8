"""Pure control law: ``decide(snapshot, tree, state) -> (actions, state)``.

No asyncio, no I/O, no clock reads: the caller supplies the time in the snapshot, so a
scenario can run the same policy in accelerated time and a test can replay any cycle.
"""

from .escalation import allowed_s
from .inputs import gpu_vector, node_power_from_readings
from .loads import headroom_w
from .rackpower import decide
from .registry import POLICIES, get_policy
from .types import (
    Action,
    Job,
    Migrate,
    NodeStatus,
    Policy,
    PolicyState,
    Requeue,
    SetCap,
    Snapshot,
)

__all__ = [
    "POLICIES",
    "Action",
    "Job",
    "Migrate",
    "NodeStatus",
    "Policy",
    "PolicyState",
    "Requeue",
    "SetCap",
    "Snapshot",
    "allowed_s",
    "decide",
    "get_policy",
    "gpu_vector",
    "headroom_w",
    "node_power_from_readings",
]
