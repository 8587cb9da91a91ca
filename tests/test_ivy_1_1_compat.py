"""A drop-in for Ivy 1.1 (tum-esm/ivy): code written the way Ivy 1.1 writes
it runs unchanged, its configs are read (from a file and over MQTT), and its
procedure modules run. The contracts are those of Ivy 1.1's own quick tests and
dummy procedure, tested here in our own words."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import src
from benchmarks.mosquitto import Broker
from src import constants
from src.types import ConfigMessageBody, DataMessageBody, LogMessageBody
from src.utils.functions import with_automation_lock
from src.utils.messaging_agent import MessagingAgent
from tests.conftest import PROJECT_DIR, Station, signed, template_config_dict, wait_until
from tests.mqtt_helpers import Subscriber, broker_fixture, publish

IVY_1_1_CONFIG: dict[str, Any] = {
    "general": {
        "config_revision": 1,
        "software_version": constants.VERSION.root,
        "system_identifier": "my-system-1",
    },
    "logging_verbosity": {
        "file_archive": "DEBUG",
        "console_prints": "INFO",
        "message_sending": "WARNING",
    },
    "updater": {
        "repository": "tum-esm/ivy",
        "provider": "github",
        "provider_host": "github.com",
        "access_token": None,
        "source_conflict_behaviour": "reuse",
    },
    "backend": None,
    "dummy_procedure": {"seconds_between_datapoints": 1},
    "system_checks": None,
}

# a procedure module written the way Ivy 1.1 writes them (`import src`, its
# section read as attributes, no `info` record), plus the one documented line
# that Ivy's explicit tum-esm-utils imports need
LEGACY_PROCEDURE = """import random
import signal
import sys
import time
from typing import Any

import tum_esm_utils
import tum_esm_utils.timing  # the one line a port from Ivy 1.1 adds

import src


def run(config: src.types.Config, name: str) -> None:
    logger = src.utils.Logger(config=config, origin=name)
    messaging_agent = src.utils.MessagingAgent()
    position = 0

    def teardown_handler(*args: Any) -> None:
        logger.debug("nothing to tear down")
        sys.exit(0)

    signal.signal(signal.SIGTERM, teardown_handler)
    backoff = tum_esm_utils.timing.ExponentialBackoff(log_info=logger.info)
    while True:
        try:
            time.sleep(
                src.utils.functions.get_time_to_next_datapoint(
                    seconds_between_datapoints=config.legacy_walk.seconds_between_datapoints,
                )
            )
            state = src.utils.StateInterface.load()
            assert (state.system.last_5_min_load or 0) < 1000, "too busy"
            position += 1 if random.random() < 0.5 else -1
            messaging_agent.add_message(src.types.DataMessageBody(data={"legacy_walk": position}))
            backoff.reset()
        except Exception as e:
            logger.exception(e)
            backoff.sleep()
"""


@pytest.mark.quick
def test_import_src_then_its_attributes_as_ivy_1_1_does() -> None:
    script = (
        "import sys, src\n"
        "assert src.constants.ROOT_DIR and src.constants.NAME == 'ivy'\n"
        "assert src.types.Config and src.types.DataMessageBody and src.types.State\n"
        "assert src.types.config.MQTTBrokerConfig and src.types.config.ForeignGeneralConfig\n"
        "for name in ('Logger', 'MessagingAgent', 'LifecycleManager', 'StateInterface',\n"
        "             'MainloopToggle'):\n"
        "    assert getattr(src.utils, name)\n"
        "assert 'paho' not in sys.modules  # a procedure that logs never loads the backends\n"
        "assert src.utils.Updater and src.utils.functions.get_time_to_next_datapoint\n"
        "assert src.utils.logger.LOGS_ARCHIVE_DIR.endswith('logs')\n"
        "assert src.utils.messaging_agent.ACTIVE_QUEUE_FILE\n"
        "assert src.procedures.dummy_procedure.run and src.main.run\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout == "ok\n", result.stderr
    with pytest.raises(AttributeError):
        src.utils.NoSuchThing


@pytest.mark.quick
def test_messages_have_integer_row_ids_that_remove_and_exclude_take() -> None:
    agent = MessagingAgent()
    assert agent.get_n_latest_messages(1) == []
    for i in range(3):
        agent.add_message(DataMessageBody(data={"test": i}))
    latest = [agent.get_n_latest_messages(n) for n in (1, 2, 3, 5)]
    assert [len(m) for m in latest] == [1, 2, 3, 3]
    ids = [m.identifier for m in latest[-1]]
    assert all(type(i) is int for i in ids) and ids == sorted(ids)
    assert all(isinstance(m.message_identifier, str) for m in latest[-1])  # stable, for receivers
    agent.remove_messages([ids[1]])
    assert [m.identifier for m in agent.get_n_latest_messages(10)] == [ids[0], ids[2]]
    agent.remove_messages([m.identifier for m in agent.get_n_latest_messages(10)])
    assert agent.get_n_latest_messages(10) == []
    agent.teardown()


@pytest.mark.quick
def test_every_message_type_oldest_first_with_exclusions() -> None:
    config = src.types.Config.load_template().to_foreign_config()
    agent = MessagingAgent()
    bodies: list[Any] = [DataMessageBody(data={"test": 1})]
    bodies += [
        LogMessageBody(level=level, subject="test", body="test")
        for level in ("DEBUG", "INFO", "WARNING", "ERROR", "EXCEPTION")
    ]
    bodies += [
        ConfigMessageBody(status=status, config=config)
        for status in ("received", "accepted", "rejected", "startup")
    ]
    for body in bodies:
        agent.add_message(body)
        time.sleep(0.01)
    all_ids = [m.identifier for m in agent.get_n_latest_messages(20)]
    assert len(set(all_ids)) == 10
    for size in (0, 1, 3):
        for excluded in itertools.combinations(all_ids, size):
            result = agent.get_n_latest_messages(20, excluded_message_ids=set(excluded))
            assert not set(excluded) & {m.identifier for m in result}
            assert set(excluded) | {m.identifier for m in result} == set(all_ids)
            assert [m.timestamp for m in result] == sorted(m.timestamp for m in result)
    kinds = [type(m.body) for m in agent.get_n_latest_messages(20)]
    assert kinds == [DataMessageBody] + [LogMessageBody] * 5 + [ConfigMessageBody] * 4
    startup = agent.get_n_latest_messages(20)[-1].body
    assert isinstance(startup, ConfigMessageBody)
    assert startup.config_revision == config.general.config_revision
    assert startup.software_version == config.general.software_version.root
    agent.teardown()


@pytest.mark.quick
def test_the_archive_has_a_message_when_add_message_returns() -> None:
    agent = MessagingAgent()
    bodies: list[DataMessageBody | LogMessageBody] = [
        DataMessageBody(data={"a": 1}),
        LogMessageBody(level="INFO", subject="s", body="b"),
    ]
    for body in bodies:
        agent.add_message(body)
    today = datetime.datetime.now(datetime.timezone.utc).date()
    archived = MessagingAgent.load_message_archive(today)
    assert [m.message_body for m in archived] == bodies
    assert [m.timestamp for m in archived] == sorted(m.timestamp for m in archived)
    agent.teardown()


@pytest.mark.quick
def test_the_automation_lock_raises_when_entered_twice() -> None:
    with with_automation_lock():
        with pytest.raises(TimeoutError):
            with with_automation_lock():
                pytest.fail("the lock was entered twice")


@pytest.mark.quick
def test_the_logger_writes_the_day_file_in_logs_archive_dir() -> None:
    config = src.types.Config.load_template()
    config.logging_verbosity.console_prints = None
    logger = src.utils.Logger(config=config, origin="some-origin")
    for level in ("debug", "info", "warning", "error"):
        getattr(logger, level)(f"a {level} message")
        last = (src.utils.Logger.read_current_log_file() or "").strip().splitlines()[-1]
        assert "some-origin" in last and level.upper() in last and f"a {level} message" in last
    try:
        1 / 0
    except ZeroDivisionError as e:
        logger.exception(e)
    text = src.utils.Logger.read_current_log_file() or ""
    assert "EXCEPTION - ZeroDivisionError: division by zero" in text


@pytest.mark.quick
def test_an_ivy_1_1_config_is_read_with_one_notice_naming_what_has_no_meaning_here() -> None:
    config = src.types.Config.load_from_string(json.dumps(IVY_1_1_CONFIG))
    notice = config.migration_notice
    assert notice is not None and notice.startswith("read as Ivy 1.1's config format")
    assert "updater.source_conflict_behaviour" in notice
    assert config.updater is not None and config.updater.source == "github"
    assert config.updater.host is None  # github.com is GitHub's own
    with_backend = json.loads(json.dumps(IVY_1_1_CONFIG))
    with_backend["backend"] = {
        "provider": "thingsboard",
        "mqtt_connection": {
            "host": "mqtt.example.org",
            "port": 8883,
            "client_id": "c1",
            "username": "user",
            "password": "a-long-password",
        },
        "max_parallel_messages": 50,
        "max_drain_time": 7200,
    }
    config = src.types.Config.load_from_string(json.dumps(with_backend))
    assert config.backend is not None
    assert (config.backend.mqtt_host, config.backend.mqtt_port) == ("mqtt.example.org", 8883)
    assert config.backend.max_drain_time == 3600
    assert "7200 -> 3600" in (config.migration_notice or "")
    broken = json.loads(json.dumps(with_backend))
    broken["backend"]["mqtt_connection"]["port"] = "eighty"
    with pytest.raises(src.types.ConfigError, match=r"backend\.mqtt_port") as refused:
        src.types.Config.load_from_string(json.dumps(broken))
    assert "read as Ivy 1.1's config format" in str(refused.value)


@pytest.mark.integration
def test_a_station_runs_from_an_ivy_1_1_config_with_an_ivy_1_1_procedure(
    station: Station,
) -> None:
    with open(os.path.join(station.project_dir, "src", "procedures", "legacy_walk.py"), "w") as f:
        f.write(LEGACY_PROCEDURE)
    config = json.loads(json.dumps(IVY_1_1_CONFIG))
    config["legacy_walk"] = {"seconds_between_datapoints": 1}
    station.write_config(config)

    checked = station.cli("config", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "read as Ivy 1.1's config format" in checked.stderr

    started = station.cli("start")
    assert started.returncode == 0, started.stdout + started.stderr

    def walked() -> bool:
        agent = MessagingAgent(
            None, station.path("active-message-queue.sqlite3"), station.path("messages")
        )
        try:
            return any(
                "legacy_walk" in getattr(m.body, "data", {})
                for m in agent.get_n_latest_messages(10_000)
            )
        finally:
            agent.close()

    assert wait_until(walked, timeout=30)
    status = station.status()
    assert status["processes"]["legacy_walk"]["alive"]
    assert status["processes"]["legacy_walk"]["restarts"] == 0
    assert "read as Ivy 1.1's config format" in station.cli("logs", "-n", "200").stdout

    migrated = station.cli(
        "config", "migrate", os.path.join(station.project_dir, "config", "config.json")
    )
    assert migrated.returncode == 0, migrated.stderr
    with open(os.path.join(station.project_dir, "config", "config.json")) as f:
        rewritten = json.load(f)
    assert rewritten["updater"] == {
        "source": "github",
        "repository": "tum-esm/ivy",
        "host": None,
        "access_token": None,
        "allow_downgrades": False,
    }
    assert os.path.isfile(os.path.join(station.project_dir, "config", "config.json.ivy-1.1"))
    assert station.cli("config", "check").returncode == 0
    assert station.cli("stop").returncode == 0


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[Broker]:
    yield from broker_fixture(str(tmp_path / "broker"))


@pytest.mark.integration
def test_an_ivy_1_1_config_pushed_over_mqtt_is_applied_and_answered_with_its_revision(
    station: Station, broker: Broker
) -> None:
    config = template_config_dict()
    config["dummy_procedure"]["seconds_between_datapoints"] = 1
    config["system_checks"] = None
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": broker.port,
        "mqtt_client_id": "legacy-station",
    }
    station.write_config(config)
    subscriber = Subscriber(broker.port, ["v1/devices/me/telemetry"], client_id="tb-server")
    assert station.cli("start").returncode == 0
    legacy = json.loads(json.dumps(IVY_1_1_CONFIG))
    legacy["general"]["system_identifier"] = config["general"]["system_identifier"]
    legacy["general"]["config_revision"] = 7
    legacy["updater"] = None
    legacy["trial"] = config["trial"]
    legacy["backend"] = {
        "provider": "thingsboard",
        "mqtt_connection": {
            "host": "127.0.0.1",
            "port": broker.port,
            "client_id": "legacy-station",
        },
        "max_parallel_messages": 50,
        "max_drain_time": 30,
    }
    publish(broker.port, "v1/devices/me/attributes", {"configuration": signed(legacy)})

    def answer() -> dict[str, Any] | None:
        for item in subscriber.items("v1/devices/me/telemetry"):
            values = item["values"]
            if values.get("config_revision") == 7 and values.get("config_status") in (
                "accepted",
                "rejected",
            ):
                return dict(values)
        return None

    assert wait_until(lambda: answer() is not None, timeout=90, interval=0.5)
    found = answer()
    assert found is not None and found["config_status"] == "accepted", found
    with open(os.path.join(station.project_dir, "config", "config.json")) as f:
        applied = json.load(f)
    assert (
        applied["backend"]["mqtt_port"] == broker.port
        and "mqtt_connection" not in applied["backend"]
    )
    assert "read as Ivy 1.1's config format" in station.cli("logs", "-n", "300").stdout
    subscriber.close()
    assert station.cli("stop").returncode == 0
