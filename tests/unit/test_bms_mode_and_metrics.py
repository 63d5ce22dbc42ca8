"""BMS mode commands in the controller (F7) and the BMS counters on /metrics (F6).

No broker: the commands are checked by the real CommandProcessor and applied to a real
Controller (tiny site) through the same hook the service wires; the wall clock is a
variable so the advisory expiry can be crossed without waiting.
"""

from __future__ import annotations

import json

from prometheus_client import generate_latest

from controller.core.controller import Controller
from controller.core.metrics import Metrics
from controller.core.setpoints import CommandLimits, CommandProcessor, ModeSwitch
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.sites import tiny_site

NOW_S = 1_750_000_000.0
LIMITS = CommandLimits(allow_mode_commands=True, max_advisory_s=600)


class Wall:
    def __init__(self) -> None:
        self.t = NOW_S

    def __call__(self) -> float:
        return self.t


def controller_and_processor() -> tuple[Controller, CommandProcessor, Wall]:
    site = parse_site(tiny_site())
    wall = Wall()
    ctl = Controller(site, controller_id="ctl", clock=lambda: wall.t - NOW_S, wall_clock=wall)
    return ctl, CommandProcessor(PowerTree(site), LIMITS), wall


def mode_now(ctl: Controller) -> str:
    """The mode read afresh: mypy would keep ``ctl.mode`` narrowed across ``run_cycle``."""
    return ctl.mode


def send_mode(
    ctl: Controller, proc: CommandProcessor, wall: Wall, cid: str, **body: object
) -> bool:
    def apply(cmd: object) -> None:
        assert isinstance(cmd, ModeSwitch)
        ctl.apply_mode_command(cmd)

    ack, _ = proc.handle(json.dumps({"type": "mode", "command_id": cid, **body}), wall.t, apply)
    return ack.accepted


def test_f7_advisory_reverts_to_enforce_at_its_expiry_and_is_audited() -> None:
    """On c203a14 the mode had no expiry: advisory stayed until someone said otherwise."""
    ctl, proc, wall = controller_and_processor()
    assert send_mode(ctl, proc, wall, "adv-1", mode="advisory", ttl_s=300)
    ctl.run_cycle(wall.t - NOW_S)
    assert ctl.mode == "advisory"
    wall.t += 299.9
    ctl.run_cycle(wall.t - NOW_S)
    assert ctl.mode == "advisory"
    wall.t += 0.2
    ctl.run_cycle(wall.t - NOW_S)
    assert mode_now(ctl) == "enforce" and ctl.mode_hold is None
    [event] = ctl.audit.recent(kinds=["mode_expired"])
    assert "adv-1" in event.reason and "back to enforce" in event.reason


def test_f7_a_second_advisory_moves_the_expiry_and_enforce_ends_it() -> None:
    ctl, proc, wall = controller_and_processor()
    assert send_mode(ctl, proc, wall, "a1", mode="advisory", ttl_s=100)
    wall.t += 50
    assert send_mode(ctl, proc, wall, "a2", mode="advisory", ttl_s=100)
    wall.t += 60  # past the first expiry, inside the second
    ctl.run_cycle(wall.t - NOW_S)
    assert ctl.mode == "advisory"
    assert send_mode(ctl, proc, wall, "e1", mode="enforce")
    assert mode_now(ctl) == "enforce" and ctl.mode_hold is None


def test_f7_advisory_over_the_configured_maximum_changes_nothing() -> None:
    ctl, proc, wall = controller_and_processor()
    assert not send_mode(ctl, proc, wall, "long", mode="advisory", ttl_s=601)
    assert not send_mode(ctl, proc, wall, "forever", mode="advisory")
    assert ctl.mode == "enforce"


def test_f7_a_controller_started_in_advisory_returns_to_advisory() -> None:
    """The hold restores the mode from before it, not always enforce."""
    ctl, proc, wall = controller_and_processor()
    ctl.mode = "advisory"
    assert send_mode(ctl, proc, wall, "a", mode="advisory", ttl_s=10)
    wall.t += 11
    ctl.run_cycle(wall.t - NOW_S)
    assert ctl.mode == "advisory" and ctl.mode_hold is None


def test_f6_bms_drop_counters_are_exported_on_metrics() -> None:
    """On c203a14 ``acks_dropped`` was counted by the link but never exported."""
    metrics = Metrics("tiny")
    stats = {"acks_dropped": 3, "commands_dropped": 7, "connected": True, "connects": 2}
    metrics.watch_bms(lambda: stats)
    text = generate_latest(metrics.registry).decode()
    assert "rackpower_bms_acks_dropped_total 3.0" in text
    assert "rackpower_bms_commands_dropped_total 7.0" in text
    assert "rackpower_bms_connected 1.0" in text
    stats["commands_dropped"] = 9  # read at scrape time
    assert "rackpower_bms_commands_dropped_total 9.0" in generate_latest(metrics.registry).decode()


def test_rejections_reach_the_audit_hook_within_the_log_budget() -> None:
    """A refused command is audited (why it was refused), but a flood of junk is not
    audited line by line: the same 50-per-10-s budget as the log."""
    from controller.core.setpoints import Ack
    from controller.integrations.bms.bridge import BmsLink
    from controller.model.config import MqttConfig

    rejected: list[Ack] = []
    tree = PowerTree(parse_site(tiny_site()))
    link = BmsLink(MqttConfig(url="mqtt://127.0.0.1:1"), tree, on_rejected=rejected.append)
    bad = {"type": "demand_response", "command_id": "r-0", "node": "rack-1", "limit_w": 9000}
    link.handle_command(json.dumps({**bad, "ttl_s": 60}).encode())
    [ack] = rejected
    assert ack.command_id == "r-0" and ack.reason and "above the rating" in ack.reason
    for i in range(1, 200):
        link.handle_command(json.dumps({**bad, "command_id": f"r-{i}"}).encode())
    assert len(rejected) == 50
    assert link.stats().commands_rejected == 200
