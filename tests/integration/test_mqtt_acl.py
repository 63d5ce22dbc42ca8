"""Broker identities under a real Mosquitto configured by ``rackpower mqtt acl``.

Each test starts Debian's Mosquitto on a loopback port with exactly the conf snippet,
ACL and (filled) password template the command wrote: TLS only, with a CA this test
makes, ``allow_anonymous false``. Mosquitto acknowledges a publish the ACL refuses and
drops it without a word (MQTT 3.1.1), so "cannot publish" is shown by ordering, not by
waiting: the forged message is sent QoS 1 and its PUBACK awaited (the broker has routed
or dropped it by then), then an allowed client publishes a control message on the same
topic; the subscriber must get the control message and nothing before it. If the ACL
let the forgery through, it would arrive first and the test would fail.

The links are the real ones (controller.agentlink.transport,
controller.integrations.bms.bridge); the agent's GPUs are sim.fake_nvml.FakeNvml, the only
fake, because there is no GPU here.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
import yaml

from controller.agent.agent_config import parse_agent_config
from controller.agent.node_agent import NodeAgent
from controller.agentlink.lease import Lease, LeaseSequence, Telemetry
from controller.agentlink.msgauth import (
    KeyFile,
    KeyStore,
    new_key_line,
    parse_keys,
    seal,
    write_key_file,
)
from controller.agentlink.transport import AgentTopics, MqttAgentLink, MqttControllerLink
from controller.cli.main import main
from controller.core.setpoints import Command
from controller.integrations.bms.bridge import BmsLink, BmsTopics
from controller.integrations.broker_acl import usernames_in_template
from controller.model.config import MqttConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.support.mqtt import Backoff
from drivers.nvml import NvmlDriver
from sim.fake_nvml import FakeNvml
from tests.fixtures.mosquitto import (
    Mosquitto,
    MosquittoFactory,
    fill_password_template,
    make_tls_files,
)
from tests.helpers import mqtt as mqtt_helpers
from tests.helpers.mqtt import Recorder, publish_qos1, user_client
from tests.helpers.ports import free_port
from tests.helpers.waiting import eventually
from tests.sites import agent_site

pytest_plugins = ["tests.fixtures.mosquitto"]

SITE = "tiny"
CTL = "rackpower-tiny"  # the default controller id and, here, its broker username
BMS = "bms"
A, B = "agent-rack-1-n1", "agent-rack-1-n2"
NODE_A = "rack-1-n1"
AGENT = AgentTopics.for_site("rackpower", SITE)
BMS_TOPICS = BmsTopics.for_site("rackpower", SITE)
WAIT_S = 15.0  # only a broken link ever waits this long


@dataclass
class AclBroker:
    """A broker run from the generated files, and every identity's password file."""

    broker: Mosquitto
    tls: ssl.SSLContext
    password_files: dict[str, Path]
    site_path: Path
    out: Path  # the generated files

    def client(self, user: str | None, password: str | None = None) -> aiomqtt.Client:
        return user_client(self.broker, self.tls, self.password_files, user, password)

    def mqtt_config(self, user: str) -> MqttConfig:
        return MqttConfig(
            url=self.broker.url, username=user, password_file=self.password_files[user]
        )


@pytest.fixture
def acl_broker(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AclBroker:
    tls_files = make_tls_files(tmp_path / "tls")
    port = free_port()
    site_path = tmp_path / "site.yaml"
    creds = tmp_path / "creds"
    site_path.write_text(
        yaml.safe_dump(
            agent_site(
                {
                    "url": f"mqtts://127.0.0.1:{port}",
                    "username": CTL,
                    "password_file": str(creds / f"{CTL}.pw"),
                }
            )
        )
    )
    out = tmp_path / "broker"
    code = main(
        ["mqtt", "acl", "--config", str(site_path), "--out-dir", str(out),
         "--install-dir", str(out), "--port", str(port), "--bind", "127.0.0.1",
         "--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key)]
    )  # fmt: skip
    assert code == 0
    # Fill the template by running the shell steps written in it (minus the chown to the
    # broker's user, which a non-root test run cannot do): the instructions must work.
    template = out / f"rackpower-{SITE}.passwd.template"
    files = fill_password_template(template, creds)
    assert set(files) == set(usernames_in_template(template.read_text()))
    for user in files:
        assert len(files[user].read_text()) == 32  # 24 random bytes, base64
        assert files[user].stat().st_mode & 0o077 == 0  # the umask in the steps
    snippet = (out / f"rackpower-{SITE}.conf").read_text()
    broker = mosquitto_factory(tls=tls_files, conf_snippet=snippet, port=port)
    ctx = ssl.create_default_context(cafile=str(tls_files.ca_cert))
    return AclBroker(broker, ctx, files, site_path, out)


def recording(ab: AclBroker, user: str, *topics: str) -> AbstractAsyncContextManager[Recorder]:
    return mqtt_helpers.recording(ab.client(user), *topics)


async def publish_as(ab: AclBroker, user: str, topic: str, payload: bytes) -> None:
    await publish_qos1(ab.client(user), topic, payload)


def forged_lease(seq: int, cap_w: float) -> bytes:
    lease = Lease.issue(CTL, seq, {0: cap_w, 1: cap_w}, 3600, agent_id=B, reason="forged")
    return lease.encode()


@pytest.mark.parametrize("forger", [A, BMS])
async def test_an_agent_or_the_bms_cannot_publish_another_agents_lease(
    acl_broker: AclBroker, forger: str
) -> None:
    topic = AGENT.lease(B)
    async with recording(acl_broker, B, topic) as rec:
        await publish_as(acl_broker, forger, topic, forged_lease(2**62, 700))
        control = forged_lease(1, 400).replace(b'"forged"', b'"control"')
        await publish_as(acl_broker, CTL, topic, control)  # positive control: allowed
        await eventually(lambda: len(rec.messages) >= 1, "the controller's lease")
        await asyncio.sleep(0.2)  # anything queued behind it shows up too
    assert rec.payloads() == [control]


async def test_an_agent_cannot_publish_another_agents_telemetry(acl_broker: AclBroker) -> None:
    async with recording(acl_broker, CTL, AGENT.all_telemetry) as rec:
        await publish_as(acl_broker, A, AGENT.telemetry(B), b"forged by A")
        await publish_as(acl_broker, A, AGENT.telemetry(A), b"A's own")
        await publish_as(acl_broker, B, AGENT.telemetry(B), b"B's own")
        await eventually(lambda: len(rec.messages) >= 2, "both agents' own telemetry")
        await asyncio.sleep(0.2)
    assert rec.messages == [(AGENT.telemetry(A), b"A's own"), (AGENT.telemetry(B), b"B's own")]


def demand_response(command_id: str, limit_w: float) -> bytes:
    return json.dumps(
        {
            "type": "demand_response",
            "command_id": command_id,
            "node": "rack-1",
            "limit_w": limit_w,
            "ttl_s": 60,
        }
    ).encode()


async def test_only_the_bms_identity_reaches_the_controllers_command_topic(
    acl_broker: AclBroker,
) -> None:
    """The real BmsLink on the controller's identity: the agent's and the controller's own
    commands are dropped by the broker, the BMS's is handled and acked to the BMS."""
    tree = PowerTree(parse_site(yaml.safe_load(acl_broker.site_path.read_text())))
    handled: list[Command] = []
    link = BmsLink(
        acl_broker.mqtt_config(CTL),
        tree,
        on_command=handled.append,
        tls_context=acl_broker.tls,
        backoff=Backoff(initial_s=0.05, max_s=0.5),
    )
    task = asyncio.create_task(link.run())
    try:
        async with recording(acl_broker, BMS, BMS_TOPICS.ack, BMS_TOPICS.status) as bms:
            # The BMS reads the controller's retained status: the link is up and allowed.
            await eventually(lambda: (BMS_TOPICS.status, b"online") in bms.messages, "online")
            await publish_as(acl_broker, A, BMS_TOPICS.cmd, demand_response("from-agent", 5000))
            await publish_as(acl_broker, CTL, BMS_TOPICS.cmd, demand_response("from-ctl", 5100))
            await publish_as(acl_broker, BMS, BMS_TOPICS.cmd, demand_response("from-bms", 5200))

            def acked() -> list[str]:
                return [json.loads(p)["command_id"] for t, p in bms.messages if t.endswith("ack")]

            await eventually(lambda: "from-bms" in acked(), "the BMS command's ack")
            await asyncio.sleep(0.2)
            assert acked() == ["from-bms"]
        assert [c.command_id for c in handled] == ["from-bms"]
        stats = link.stats()
        assert (stats.commands_accepted, stats.commands_rejected) == (1, 0)
    finally:
        await link.stop()
        with suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(
    ("user", "password", "tls"),
    [(None, None, True), (A, "wrong password", True), (BMS, "", True), (A, None, False)],
    ids=["anonymous", "wrong-password", "empty-password", "right-password-without-tls"],
)
async def test_who_cannot_connect(
    acl_broker: AclBroker, user: str | None, password: str | None, tls: bool
) -> None:
    if user is not None and password is None:
        password = acl_broker.password_files[user].read_text()
    client = aiomqtt.Client(
        acl_broker.broker.host,
        acl_broker.broker.port,
        username=user,
        password=password,
        tls_context=acl_broker.tls if tls else None,
        timeout=5,
    )
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass
    # Positive control: the same broker takes the right identity over TLS.
    async with acl_broker.client(A):
        pass


async def test_the_password_template_loaded_by_mistake_lets_nobody_in(
    acl_broker: AclBroker, mosquitto_factory: MosquittoFactory
) -> None:
    conf = (acl_broker.out / f"rackpower-{SITE}.conf").read_text()
    template = acl_broker.out / f"rackpower-{SITE}.passwd.template"
    port = free_port()
    conf = conf.replace(f"listener {acl_broker.broker.port} ", f"listener {port} ")
    conf = re.sub(r"(?m)^password_file .*$", f"password_file {template}", conf)
    assert acl_broker.broker.tls is not None
    wrong = mosquitto_factory(tls=acl_broker.broker.tls, conf_snippet=conf, port=port)
    for user in (CTL, BMS, A):
        for password in ("", acl_broker.password_files[user].read_text()):
            client = aiomqtt.Client(
                wrong.host, port, username=user, password=password,
                tls_context=acl_broker.tls, timeout=5,
            )  # fmt: skip
            with pytest.raises(aiomqtt.MqttError):
                async with client:
                    pass


async def test_real_links_lease_end_to_end_under_the_acl_over_tls(
    acl_broker: AclBroker, tmp_path: Path
) -> None:
    """Controller and agent links with their own username and password_file over mqtts://,
    signing as a site with ``agent_auth`` does: a signed lease is enforced (read back from
    the fake NVML), telemetry and status come back. Then both defences, each against a
    lease with the right controller id and a higher seq (inside the seq window, so only
    they can stop it), each changing no GPU limit:

    - the ACL: sealed with B's own agent key and published with B's broker credentials,
      it is dropped by the broker (it never reaches A: A refuses nothing);
    - the signature: published with the controller's broker credentials (a stolen broker
      password) but without A's key, once unsigned and once sealed with B's key, it
      reaches A and is refused as unauthenticated.

    The real controller's next, lower seq is applied after each: no forgery moved the seq.
    """
    keys_dir = tmp_path / "agent-keys"
    keys_dir.mkdir(mode=0o700)
    a_key = tmp_path / f"{A}.key"  # A's auth.key_file; the controller holds the same file
    line = new_key_line("k1")
    write_key_file(a_key, line)
    write_key_file(keys_dir / f"{A}.key", line)
    b_key = parse_keys(new_key_line("k1"), "B's key")[0]  # B's own secret, not A's
    ctl = MqttControllerLink(
        acl_broker.mqtt_config(CTL),
        SITE,
        tls_context=acl_broker.tls,
        backoff=Backoff(0.05, 0.5),
        keys=KeyStore(keys_dir),
    )
    agent_cfg = parse_agent_config(
        {
            "site": SITE, "agent_id": A, "node_id": NODE_A, "controller_id": CTL,
            "failsafe_w": 400, "telemetry_hz": 10, "auth": {"key_file": str(a_key)},
            "mqtt": {"url": acl_broker.broker.url, "username": A,
                     "password_file": str(acl_broker.password_files[A])},
        },
        "test",
    )  # fmt: skip
    agent_link = MqttAgentLink(
        agent_cfg.mqtt.as_site_mqtt(),
        SITE,
        A,
        tls_context=acl_broker.tls,
        backoff=Backoff(0.05, 0.5),
        keepalive_s=5,
        keys=KeyFile(a_key),
    )
    fake = FakeNvml.for_node(NODE_A, 4, min_w=100, max_w=500, power_w=300)

    def enforced() -> list[float]:
        return [fake.enforced_limit_w(i) for i in range(4)]

    seqs = LeaseSequence()

    def lease(cap_w: float) -> Lease:
        return Lease.issue(CTL, seqs.next(), dict.fromkeys(range(4), cap_w), 30, agent_id=A)

    tasks = [asyncio.create_task(ctl.run()), asyncio.create_task(agent_link.run())]
    async with NvmlDriver(NODE_A, fake) as driver:
        agent = NodeAgent(agent_cfg, driver, agent_link)
        agent_task = asyncio.create_task(agent.run())
        try:
            await eventually(lambda: ctl.agents_online().get(A) is True, "agent status read")
            await eventually(lambda: enforced() == [400.0] * 4, "failsafe at start")
            first = lease(350)
            ctl.send_lease(A, first)
            await eventually(lambda: enforced() == [350.0] * 4, "lease enforced")
            got: list[Telemetry] = []
            async with asyncio.timeout(WAIT_S):
                async for t in ctl.telemetry():
                    got.append(t)
                    if t.seq == first.seq:
                        break
            assert (got[-1].agent_id, got[-1].limit_w) == (A, [350.0] * 4)

            assert ctl.stats().auth_refused == 0  # A's reports are signed and checked
            # 60 s ahead of the real seq: inside the agent's seq window (600 s).
            forged = Lease.issue(
                CTL, first.seq + 60_000, dict.fromkeys(range(4), 500.0), 3600, agent_id=A
            ).encode()
            # 1. The ACL: B's broker identity may not publish on A's lease topic.
            await publish_as(acl_broker, B, AGENT.lease(A), seal("lease", A, forged, b_key))
            ctl.send_lease(A, lease(300))  # lower seq than the forgery: applied if dropped
            await eventually(lambda: enforced() == [300.0] * 4, "the real lease after")
            assert agent_link.stats().auth_refused == 0  # dropped by the broker: never here
            # 2. The signature: the controller's broker identity, without A's key.
            for payload in (forged, seal("lease", A, forged, b_key)):
                await publish_as(acl_broker, CTL, AGENT.lease(A), payload)
            await eventually(lambda: agent_link.stats().auth_refused == 2, "both refused")
            assert enforced() == [300.0] * 4
            ctl.send_lease(A, lease(250))  # still below the forgeries' seq: applied
            await eventually(lambda: enforced() == [250.0] * 4, "the real lease after")
            assert agent_link.stats().bad_messages == 0
            assert agent.state.seq is not None and agent.state.seq < first.seq + 60_000
        finally:
            agent.stop()
            await agent_task
            for link in (agent_link, ctl):
                await link.stop()
            for task in tasks:
                with suppress(asyncio.CancelledError):
                    await task
