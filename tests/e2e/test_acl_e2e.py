"""Issue 11 end to end, under the broker identities ``rackpower mqtt acl`` generates.

`rackpower run` as a process, the harness's real node agents on the simulator's fake
NVML (the only fake: no GPU here) and the simulated site on real Modbus and SNMP, all
over a real Mosquitto started from exactly the files ``rackpower mqtt acl --config
<site>`` wrote (the CLI is run, nothing is hand-written): TLS only with a CA this test
makes, ``allow_anonymous false``, and the password file made by the steps written in
the generated template. Every identity logs in as itself: the controller and each agent
through ``username`` + ``password_file`` in their configs, the BMS and the attackers as
plain clients with the credentials they hold.

Mosquitto acknowledges a publish its ACL refuses and drops it silently (MQTT 3.1.1), so
"cannot publish" is shown by ordering: the forgery is sent QoS 1 and its PUBACK awaited
(the broker has routed or dropped it by then), then the test waits for the topic's real
traffic that comes after it; the forgery must never have arrived before that.

Run with ``-s`` for the cycle figures of the burst test.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.agentlink.lease import Lease
from controller.agentlink.msgauth import Key, parse_keys, seal
from controller.agentlink.transport import AgentTopics
from controller.model.loader import load_site
from tests.e2e.harness import (
    CONTROLLER_ID,
    GPU_MAX_W,
    GPU_MIN_W,
    RACKPOWER,
    RACKS,
    REPO,
    SITE,
    ControllerProcess,
    Plant,
    Ports,
    bms_client,
    controller_leasing,
    eventually,
    held,
    running_plant,
    site_dict,
    write_site,
)
from tests.fixtures.mosquitto import (
    Mosquitto,
    MosquittoFactory,
    fill_password_template,
    make_tls_files,
)
from tests.helpers import mqtt as mqtt_helpers
from tests.helpers.mqtt import Recorder, publish_qos1, user_client
from tests.helpers.ports import free_port

pytest_plugins = ["tests.fixtures.mosquitto"]

BMS_USER = "bms"  # the generated ACL's default BMS identity
AGENT = AgentTopics.for_site("rackpower", SITE)
BASE = f"rackpower/{SITE}"
CYCLE_S = 0.1  # 100 cycles in a 10 s window: a p99 that is not just the maximum
WINDOW_S = 10.0
BURST_N = 2000


@dataclass
class AclSystem:
    plant: Plant
    ctl: ControllerProcess
    broker: Mosquitto
    tls: ssl.SSLContext
    passwords: dict[str, Path]  # username -> its password file
    keys_dir: Path  # the controller's agent keys (on this host also the agents' files)
    generated: dict[str, str]  # file name -> text, as `rackpower mqtt acl` wrote them

    def client(self, user: str | None, password: str | None = None) -> aiomqtt.Client:
        return user_client(self.broker, self.tls, self.passwords, user, password, prefix="e2e")

    async def publish_as(self, user: str, topic: str, payload: bytes) -> None:
        await publish_qos1(self.client(user), topic, payload)

    def agent_key(self, agent_id: str) -> Key:
        path = self.keys_dir / f"{agent_id}.key"
        return parse_keys(path.read_text(), str(path))[0]

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = await self.ctl.http.get("/metrics")
        r.raise_for_status()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text)
            for s in fam.samples
        }


def _site(ports: Ports, port: int, creds: Path, keys_dir: Path) -> dict[str, Any]:
    site = site_dict(ports, f"mqtts://127.0.0.1:{port}", keys_dir=keys_dir)
    site["integrations"]["mqtt"].update(
        {"username": CONTROLLER_ID, "password_file": str(creds / f"{CONTROLLER_ID}.pw")}
    )
    site["policy"]["cycle_s"] = CYCLE_S
    return site


@pytest.fixture
async def system(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[AclSystem]:
    tls_files = make_tls_files(tmp_path / "tls")
    port, ports = free_port(), Ports.pick()
    creds, keys_dir, out = tmp_path / "creds", tmp_path / "agent-keys", tmp_path / "broker"
    site_path = write_site(tmp_path / "site.yaml", _site(ports, port, creds, keys_dir))
    acl = await asyncio.to_thread(
        subprocess.run,
        [str(RACKPOWER), "mqtt", "acl", "--config", str(site_path), "--out-dir", str(out),
         "--install-dir", str(out), "--port", str(port), "--bind", "127.0.0.1",
         "--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert acl.returncode == 0, acl.stderr
    assert "warning" not in acl.stderr, acl.stderr  # the site is what the files expect
    stem = f"rackpower-{SITE}"
    passwords = fill_password_template(out / f"{stem}.passwd.template", creds)
    agents = [a for a in passwords if a.startswith("agent-")]
    assert set(passwords) == {CONTROLLER_ID, BMS_USER, *agents} and len(agents) == 4
    generated = {p.name: p.read_text() for p in out.glob(f"{stem}.*")}
    conf = generated[f"{stem}.conf"]
    assert "allow_anonymous false" in conf and f"listener {port} 127.0.0.1" in conf
    broker = mosquitto_factory(tls=tls_files, conf_snippet=conf, port=port)
    tls = ssl.create_default_context(cafile=str(tls_files.ca_cert))

    def agent_mqtt(agent_id: str) -> dict[str, Any]:
        return {"url": broker.url, "username": agent_id, "password_file": str(passwords[agent_id])}

    site = load_site(site_path)
    async with running_plant(site, broker.url, agent_mqtt=agent_mqtt, tls_context=tls) as plant:
        ca = {"SSL_CERT_FILE": str(tls_files.ca_cert)}  # the daemon's CA for mqtts://
        try:
            async with controller_leasing(plant, site_path, ports.api, tmp_path, env=ca) as ctl:
                yield AclSystem(plant, ctl, broker, tls, passwords, keys_dir, generated)
        finally:
            print(f"--- mosquitto (tail) ---\n{broker.log_tail(15)}")


def recording(s: AclSystem, user: str, *topics: str) -> AbstractAsyncContextManager[Recorder]:
    """A second connection with ``user``'s credentials, subscribed (SUBACK awaited)."""
    return mqtt_helpers.recording(s.client(user), *topics)


# -- 1. a forged lease --------------------------------------------------------------------


async def test_forged_lease_with_right_controller_id_and_higher_seq_changes_no_gpu_limit(
    system: AclSystem,
) -> None:
    """F2's forgery (copied controller id, seq ahead, every GPU at 700 W) from every other
    client there is: another agent's identity (with that agent's own key), the BMS's,
    anonymous, and the controller's own broker password without the agent's key. Limits
    are read back from the fake NVML throughout; then the same forgery sealed with the
    agent's real key is applied, which shows the forgery and the read-back were real."""
    s, plant = system, system.plant
    plant.sim.load_step(1.8)  # 90 % of TDP: both racks capped, every GPU well below 700 W

    def capped() -> bool:
        return all(max(plant.enforced_w(n)) < 0.8 * GPU_MAX_W for n in plant.agents)

    await held(capped, "every server capped below 560 W", samples=8)
    node, other = plant.servers(RACKS[0])
    target, thief = plant.tree.node(node).agent, plant.tree.node(other).agent
    assert target is not None and thief is not None
    agent, link = plant.agents[node], plant.links[node]
    seq0 = agent.state.seq
    assert seq0 is not None
    forged = Lease.issue(
        CONTROLLER_ID, seq0 + 60_000, dict.fromkeys(range(8), GPU_MAX_W), 3600, agent_id=target
    ).encode()  # 60 s ahead: inside the agent's seq window, so only the defences stop it
    peak_w: list[float] = []

    async def watch() -> None:
        while True:
            peak_w.append(max(plant.enforced_w(node)))
            await asyncio.sleep(0.02)

    async def real_lease_after() -> None:
        last = agent.state.seq
        assert last is not None
        await eventually(lambda: (agent.state.seq or 0) > last, "a real lease applied after")

    watcher = asyncio.create_task(watch())
    try:
        # 1. The ACL: another agent (its credentials and its own key) and the BMS may not
        #    publish on this agent's lease topic; the broker drops it, the agent sees nothing.
        lease_topic = AGENT.lease(target)
        await s.publish_as(thief, lease_topic, seal("lease", target, forged, s.agent_key(thief)))
        await s.publish_as(BMS_USER, AGENT.lease(target), forged)
        await real_lease_after()
        assert link.stats().auth_refused == 0  # dropped by the broker: never reached it
        # 2. Anonymous and wrong-password clients do not get on the broker at all.
        for user, password in ((None, None), (CONTROLLER_ID, "guessed")):
            with pytest.raises(aiomqtt.MqttError):
                async with s.client(user, password):
                    pass
        # 3. The signature: the controller's broker password (stolen) without the agent's
        #    key, unsigned and sealed with another agent's key: it arrives and is refused.
        await s.publish_as(CONTROLLER_ID, lease_topic, forged)
        wrong_key = seal("lease", target, forged, s.agent_key(thief))
        await s.publish_as(CONTROLLER_ID, lease_topic, wrong_key)
        await eventually(lambda: link.stats().auth_refused == 2, "both forgeries refused")
        await real_lease_after()
        await asyncio.sleep(10 * CYCLE_S)  # a few more real leases, limits still sampled
    finally:
        watcher.cancel()
        with suppress(asyncio.CancelledError):
            await watcher
    state = agent.state
    assert state.seq is not None and seq0 < state.seq < seq0 + 60_000  # the controller's
    assert not state.failsafe
    assert len(peak_w) >= 25 and max(peak_w) < 0.8 * GPU_MAX_W, max(peak_w)
    assert capped()  # no other server moved either
    assert plant.power_w(RACKS[0]) <= plant.tree.node(RACKS[0]).envelope_w
    # Positive control: the same lease sealed with the agent's own key is obeyed.
    sealed = seal("lease", target, forged, s.agent_key(target))
    await s.publish_as(CONTROLLER_ID, AGENT.lease(target), sealed)
    await eventually(lambda: plant.enforced_w(node) == [GPU_MAX_W] * 8, "the sealed forgery")
    assert agent.state.seq == seq0 + 60_000


# -- 2. an agent's credentials on another agent's topics -------------------------------------


async def test_an_agents_credentials_cannot_publish_another_agents_topics(
    system: AclSystem,
) -> None:
    """A's broker identity publishes on B's telemetry, status and lease topics and the BMS
    command topic; each forgery is followed on its topic by the real sender's traffic and
    never arrives. A's identity subscribed to B's lease gets none of B's leases either."""
    s, plant = system, system.plant
    a_node, b_node = plant.servers(RACKS[0])
    a, b = plant.tree.node(a_node).agent, plant.tree.node(b_node).agent
    assert a is not None and b is not None
    mark = b"forged-by-" + a.encode()
    forged_seq = (plant.agents[b_node].state.seq or 0) + 60_000
    forged_lease = Lease.issue(
        CONTROLLER_ID, forged_seq, dict.fromkeys(range(8), GPU_MIN_W), 3600,
        agent_id=b, reason="forged-by-" + a,
    ).encode()  # fmt: skip
    forged_cmd = json.dumps(
        {"type": "demand_response", "command_id": "forged-by-agent", "node": RACKS[0],
         "limit_w": 5000, "ttl_s": 600}
    ).encode()  # fmt: skip
    real_cmd = forged_cmd.replace(b"forged-by-agent", b"from-the-bms")
    before = await s.metrics()
    async with (
        recording(s, CONTROLLER_ID, AGENT.telemetry(b), AGENT.status(b)) as ctl_view,
        recording(s, b, AGENT.lease(b)) as b_view,
        recording(s, a, AGENT.lease(b)) as a_snoop,
        bms_client(s.broker.host, s.broker.port, "cmd/ack", username=BMS_USER,
                   password=s.passwords[BMS_USER].read_text(), tls_context=s.tls) as bms,
    ):  # fmt: skip
        await s.publish_as(a, AGENT.telemetry(b), mark + b" telemetry")
        await s.publish_as(a, AGENT.status(b), b"offline")  # retained status is what counts
        await s.publish_as(a, AGENT.lease(b), forged_lease)
        await s.publish_as(a, f"{BASE}/cmd", forged_cmd)
        await bms.command(real_cmd)  # the BMS's own, after the forgery
        n_tel, n_lease = len(ctl_view.on(AGENT.telemetry(b))), len(b_view.on(AGENT.lease(b)))
        await eventually(
            lambda: len(ctl_view.on(AGENT.telemetry(b))) >= n_tel + 4, "B's real telemetry"
        )
        await eventually(lambda: len(b_view.on(AGENT.lease(b))) >= n_lease + 4, "B's leases")
        await bms.ack_for("from-the-bms")
        await asyncio.sleep(0.5)  # anything queued behind shows up too
        after = await s.metrics()
    assert not any(mark in p for _, p in ctl_view.messages)  # B's telemetry: only B's
    assert ctl_view.on(AGENT.status(b)) == [b"online"]  # the retained real one, no offline
    assert not any(b"forged-by-" in p for _, p in b_view.messages)  # B's leases: only ours
    assert a_snoop.messages == []  # A does not even read B's leases
    assert set(bms.acks()) == {"from-the-bms"}  # the agent's command never reached us
    assert "forged-by-agent" not in plant_audit(system)
    key = ("rackpower_agent_telemetry_refused_total", ())
    assert after[key] == before[key]  # dropped at the broker, not refused by the daemon
    b_seq = plant.agents[b_node].state.seq
    assert b_seq is not None and b_seq < forged_seq  # B runs on the controller's leases
    assert min(plant.enforced_w(b_node)) > GPU_MIN_W  # not the forged floor
    assert plant.links[b_node].stats().auth_refused == 0  # nothing forged reached B


def plant_audit(s: AclSystem) -> str:
    return json.dumps(s.ctl.audit())


# -- 3. a BMS burst and the cycle's p99 --------------------------------------------------------

BURST = """
import json, ssl, sys, time
import paho.mqtt.client as mqtt
host, port, topic, ca, user, pw_file = sys.argv[1:7]
n, seconds = int(sys.argv[7]), float(sys.argv[8])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bms-burst")
c.tls_set(ca_certs=ca)
c.username_pw_set(user, open(pw_file).read())
connected = []
c.on_connect = lambda cl, ud, flags, rc, props: connected.append(rc)
c.connect(host, int(port))
c.loop_start()
while not connected:
    time.sleep(0.01)
assert not connected[0].is_failure, connected[0]
print("connected", flush=True)
sys.stdin.readline()  # "go"
t0 = time.monotonic()
infos = []
for i in range(n):
    cmd = {"type": "demand_response", "command_id": f"burst-{i}", "node": "row-1",
           "limit_w": 20000 + i % 100, "ttl_s": 60}
    infos.append(c.publish(topic, json.dumps(cmd), qos=1))
    ahead = t0 + (i + 1) * seconds / n - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
for info in infos:
    info.wait_for_publish(timeout=60)
print(f"{time.monotonic() - t0:.2f}", flush=True)
c.loop_stop()
c.disconnect()
"""


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def buckets(m: Samples, name: str) -> Iterator[tuple[float, float]]:
    """(upper bound, cumulative count) of a histogram, in bound order."""
    rows = [(float(dict(lab)["le"]), v) for (n, lab), v in m.items() if n == f"{name}_bucket"]
    return iter(sorted(rows))


def window_quantile(before: Samples, after: Samples, name: str, q: float) -> tuple[float, int]:
    """The q-quantile of what a histogram observed between two scrapes, interpolated in
    its bucket as Prometheus' histogram_quantile does; and how many observations."""
    pairs = zip(buckets(after, name), buckets(before, name), strict=True)
    cum = [(le, a - b) for (le, a), (_, b) in pairs]
    total = cum[-1][1]
    assert total > 0
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in cum:
        if count >= rank:
            if math.isinf(le):
                return lower, int(total)
            return lower + (le - lower) * (rank - below) / (count - below), int(total)
        lower, below = le, count
    raise AssertionError("unreachable: +Inf holds every observation")


async def test_bms_burst_of_2000_in_10s_leaves_cycle_p99_within_20_percent(
    system: AclSystem,
) -> None:
    """2,000 demand responses in 10 s from the BMS identity (over TLS, from another
    process: a BMS is not in our process) while ``rackpower run`` cycles every 0.1 s.
    The cycle's p99 comes from the daemon's own histograms on /metrics, scraped at the
    start and end of a quiet window and of the burst window, both 10 s in the same run;
    the same kind of demand response is in force in both, so the policy does the same
    work. Asserted on the cycle's CPU time (the flood may add to the cycle's own work:
    GC, bigger stores); wall time is printed: on a shared 2-core machine the burst's
    publisher, broker and TLS preempt the daemon, which says nothing about the code."""
    s = system
    creds = str(s.passwords[BMS_USER])
    password = s.passwords[BMS_USER].read_text()
    async with bms_client(
        s.broker.host, s.broker.port, "cmd/ack", username=BMS_USER, password=password,
        tls_context=s.tls,
    ) as bms:  # fmt: skip
        await bms.command(
            {"type": "demand_response", "command_id": "pre", "node": "row-1",
             "limit_w": 20000, "ttl_s": 600}
        )  # fmt: skip
        assert (await bms.ack_for("pre"))["status"] == "accepted"
        assert s.broker.tls is not None
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BURST, s.broker.host, str(s.broker.port), f"{BASE}/cmd",
            str(s.broker.tls.ca_cert), BMS_USER, creds, str(BURST_N), str(WINDOW_S),
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            async with asyncio.timeout(30):
                assert (await proc.stdout.readline()).strip() == b"connected"
            await asyncio.sleep(2.0)  # settle after the connect
            t0, m0 = time.monotonic(), await s.metrics()
            await asyncio.sleep(WINDOW_S)
            t1, m1 = time.monotonic(), await s.metrics()
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            await asyncio.sleep(WINDOW_S)
            t2, m2 = time.monotonic(), await s.metrics()
            async with asyncio.timeout(60):
                sent_s = float((await proc.stdout.readline()).decode())
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await eventually(lambda: len(bms.acks()) >= BURST_N + 1, f"{BURST_N + 1} acks")
        acks = bms.acks()
    m3 = await s.metrics()

    def total(name: str, m: Samples = m3) -> float:
        return m[(name, ())]

    assert sum(1 for a in acks.values() if a["status"] == "accepted") == BURST_N + 1
    assert total("rackpower_bms_commands_accepted_total") == BURST_N + 1
    assert total("rackpower_bms_commands_dropped_total") == 0
    assert total("rackpower_bms_acks_dropped_total") == 0
    cpu, wall = "rackpower_cycle_cpu_seconds", "rackpower_cycle_duration_seconds"
    q_cpu, n_q = window_quantile(m0, m1, cpu, 0.99)
    b_cpu, n_b = window_quantile(m1, m2, cpu, 0.99)
    q_wall, _ = window_quantile(m0, m1, wall, 0.99)
    b_wall, _ = window_quantile(m1, m2, wall, 0.99)
    q_med, _ = window_quantile(m0, m1, cpu, 0.5)
    b_med, _ = window_quantile(m1, m2, cpu, 0.5)
    overruns = "rackpower_cycle_overruns_total"
    print(
        f"\nBMS burst under the generated ACL: {BURST_N} commands sent in {sent_s:.2f} s;"
        f" windows quiet {t1 - t0:.2f} s ({n_q} cycles), burst {t2 - t1:.2f} s ({n_b} cycles);"
        f" cycle CPU p99 quiet {q_cpu * 1e3:.3f} ms, burst {b_cpu * 1e3:.3f} ms"
        f" ({b_cpu / q_cpu:.2f}x; p50 {q_med * 1e3:.3f} -> {b_med * 1e3:.3f} ms);"
        f" cycle wall p99 quiet {q_wall * 1e3:.3f} ms, burst {b_wall * 1e3:.3f} ms"
        f" ({b_wall / q_wall:.2f}x); overruns quiet {total(overruns, m1) - total(overruns, m0):g},"
        f" burst {total(overruns, m2) - total(overruns, m1):g}"
    )
    assert abs((t1 - t0) - (t2 - t1)) < 0.5 and n_q >= 80 and n_b >= 80  # comparable windows
    assert WINDOW_S <= sent_s < WINDOW_S + 2  # the burst filled the burst window
    assert b_cpu <= 1.2 * q_cpu, (q_cpu, b_cpu)
    # The p99 of 100 cycles is their second-slowest, which on a shared VM is host noise
    # (steal time counts as the thread's CPU): 1 ms of work added to every burst cycle
    # (+50 % at p50) moved it by 3 %. The median is not reached by that noise and shows
    # a steady cost the flood would add to each cycle (that injected 1 ms: 1.51x).
    assert b_med <= 1.2 * q_med, (q_med, b_med)
