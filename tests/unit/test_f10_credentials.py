"""F10: a password written into a URL is refused at validation and never printed or logged.

Secrets in URLs end up in logs, process lists and error messages; the config has
``username`` + ``password_env``/``password_file`` (and ``token_env``/``token_file``) for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import yaml

from controller.agent.agent_config import load_agent_config
from controller.cli.main import main
from controller.core.points import Point
from controller.integrations.tsdb.writer import TsdbWriter
from controller.model.config import ConfigError, InfluxConfig, MqttConfig
from controller.model.secrets import redact_url
from controller.support.mqtt import MqttSetupError, parse_broker_url
from tests.helpers.ports import free_port
from tests.sites import tiny_site

SECRET = "s3cretPW"  # a test value: the thing that must never be printed
REFUSAL = "credentials in the URL are not allowed"


@pytest.mark.parametrize(
    ("integrations", "path"),
    [
        ({"mqtt": {"url": f"mqtt://ops:{SECRET}@127.0.0.1:1883"}}, "integrations.mqtt.url"),
        ({"influx": {"url": f"http://ops:{SECRET}@127.0.0.1:8086"}}, "integrations.influx.url"),
        (
            {"scheduler": {"kind": "slurm", "url": f"https://ops:{SECRET}@127.0.0.1:6820"}},
            "integrations.scheduler.url",
        ),
    ],
    ids=["mqtt", "influx", "scheduler"],
)
def test_f10_validate_refuses_userinfo_without_printing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], integrations: dict[str, object], path: str
) -> None:
    cfg = tiny_site()
    cfg["integrations"] = integrations
    f = tmp_path / "site.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(f)]) == 2
    captured = capsys.readouterr()
    assert f"{f}: {path}: {REFUSAL}" in captured.err, captured.err
    assert SECRET not in captured.err + captured.out


def test_f10_validate_refuses_userinfo_in_a_device_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_site()
    cfg["devices"][0]["address"] = f"ops:{SECRET}@127.0.0.1:15020"
    f = tmp_path / "site.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}: devices[0].address: {REFUSAL}" in err, err
    assert SECRET not in err


def test_f10_agent_config_refuses_userinfo(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "site": "tiny",
                "agent_id": "a1",
                "node_id": "n1",
                "controller_id": "c1",
                "failsafe_w": 300,
                "mqtt": {"url": f"mqtts://ops:{SECRET}@127.0.0.1:8883"},
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        load_agent_config(f)
    assert f"{f}: mqtt.url: {REFUSAL}" in str(err.value)
    assert SECRET not in str(err.value)


def test_f10_broker_url_error_does_not_print_the_password() -> None:
    """What ``rackpower run`` printed: the MqttSetupError message, password included."""
    with pytest.raises(MqttSetupError) as err:
        parse_broker_url(f"mqtt://ops:{SECRET}@127.0.0.1:1883")
    assert SECRET not in str(err.value)
    assert REFUSAL in str(err.value)
    for bad in (f"mqtx://ops:{SECRET}@h", f"mqtt://ops:{SECRET}@h:99999", f"mqtt://ops:{SECRET}@"):
        with pytest.raises(MqttSetupError) as err:
            parse_broker_url(bad)
        assert SECRET not in str(err.value), str(err.value)


def test_f10_redact_url() -> None:
    assert redact_url(f"mqtt://ops:{SECRET}@h:1883/x") == "mqtt://***@h:1883/x"
    assert redact_url(f"http://{SECRET}@h") == "http://***@h"
    assert redact_url("http://h:8086") == "http://h:8086"
    assert redact_url(f"ops:{SECRET}@h:502") == "***@h:502"


async def test_f10_influx_url_with_credentials_is_logged_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed write logs the URL; with userinfo in it, the password went to the journal.

    Validation now refuses such a URL, so the config is built without it (as a caller
    that skips validation would) to show the writer redacts on its own. Real connection
    refused on a free loopback port (nothing listens there)."""
    port = free_port()
    url = f"http://ops:{SECRET}@127.0.0.1:{port}"
    w = TsdbWriter(
        InfluxConfig.model_construct(url=url, flush_s=0.01, batch_size=1),
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    caplog.set_level(logging.INFO, logger="controller.integrations.tsdb.writer")
    async with w:
        w.submit([Point("rackpower_test", {"x": "1"}, {"v": 1.0}, time.time_ns())])
        for _ in range(1000):  # bounds a hang at 10 s
            if w.stats().failed_batches >= 1:
                break
            await asyncio.sleep(0.01)
    assert w.stats().failed_batches >= 1
    text = caplog.text + str(w.stats().last_error)
    assert "write to http://***@127.0.0.1" in caplog.text, caplog.text
    assert SECRET not in text


def test_f10_a_raw_validation_error_does_not_show_the_password() -> None:
    """A ValidationError printed whole (``demo --mqtt``, a traceback) hides the input."""
    with pytest.raises(ValueError, match=REFUSAL) as err:
        MqttConfig(url=f"mqtt://ops:{SECRET}@127.0.0.1:1883")
    assert SECRET not in str(err.value)
