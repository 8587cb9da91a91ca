"""A procedure is one module plus one config section: a procedure written only
against the reference API runs when dropped into a copy of the project; broken
modules and bad state writes are reported, never a traceback or a dead main
loop."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from tests.conftest import PROJECT_DIR, Station, template_config_dict, wait_until
from tests.mqtt_helpers import Subscriber, broker_fixture
from tests.test_station import agent_of, fast_config

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[Broker]:
    yield from broker_fixture(str(tmp_path / "broker"))


def add_procedure(station: Station, name: str, source: str) -> None:
    with open(os.path.join(station.project_dir, "src", "procedures", f"{name}.py"), "w") as f:
        f.write(source)


def archived_data(station: Station) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    directory = station.path("messages")
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        with open(os.path.join(directory, name)) as f:
            found += [json.loads(line)["body"] for line in f if line.strip()]
    return [body["data"] for body in found if body["variant"] == "data"]


def test_a_procedure_written_against_the_reference_runs_from_its_module(
    station: Station, broker: Broker
) -> None:
    shutil.copy(
        os.path.join(PROJECT_DIR, "tests", "reference_procedure.py"),
        os.path.join(station.project_dir, "src", "procedures", "thermometer.py"),
    )
    config = fast_config()
    config["thermometer"] = {"seconds_between_datapoints": 1}
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": broker.port,
        "mqtt_client_id": "ivy-procedures",
    }
    station.write_config(config)
    subscriber = Subscriber(broker.port, ["v1/devices/me/telemetry"], client_id="procedures")
    reference = station.cli("config", "reference")
    assert "### `thermometer`" in reference.stdout  # the reference picks it up
    checked = station.cli("config", "check")
    assert checked.returncode == 0, checked.stderr
    started = station.cli("start")
    assert started.returncode == 0, started.stderr

    def delivered() -> int:
        return sum(1 for i in subscriber.items("v1/") if "temperature_c" in i["values"])

    assert wait_until(lambda: delivered() >= 2, timeout=60)
    agent = agent_of(station)
    agent.flush_archive()
    agent.close()
    assert any("temperature_c" in data for data in archived_data(station))
    status = station.status()
    assert status["processes"]["thermometer"]["alive"]
    assert status["processes"]["thermometer"]["restarts"] == 0
    with open(station.path("state.json")) as f:
        state = json.load(f)
    assert isinstance(state["system"]["last_boot_time"], float)  # the datetime, stored readably
    assert not [n for n in os.listdir(station.data_dir) if ".corrupt-" in n]
    assert station.cli("stop").returncode == 0
    subscriber.close()


BAD_STATE_WRITER = """
import time
import pydantic
from src.types import Config
from src.types.procedure import ProcedureInfo
from src.utils.state_interface import StateInterface


class BadConfig(pydantic.BaseModel):
    pass


def run(config: Config, name: str) -> None:
    time.sleep(0.5)
    with StateInterface.update() as state:
        state.system.cpu_usage_percent = "very hot"
    time.sleep(3600)


info = ProcedureInfo(run=run, config_model=BadConfig)
"""


def test_a_wrong_state_write_fails_in_the_procedure_and_the_state_stays_intact(
    station: Station,
) -> None:
    add_procedure(station, "bad_writer", BAD_STATE_WRITER)
    config = fast_config()
    config["bad_writer"] = {}
    station.write_config(config)
    assert station.cli("start").returncode == 0
    assert wait_until(
        lambda: (
            "cpu_usage_percent" in (station.status()["processes"]["bad_writer"]["last_error"] or "")
        ),
        timeout=30,
    )
    error = station.status()["processes"]["bad_writer"]["last_error"]
    assert "very hot" in error  # the field and the value, for the author
    with open(station.path("state.json")) as f:
        json.load(f)  # still readable
    assert not [n for n in os.listdir(station.data_dir) if ".corrupt-" in n]
    assert station.status()["processes"]["dummy_procedure"]["alive"]
    assert station.cli("stop").returncode == 0


def test_broken_procedure_modules_are_reported_and_the_rest_runs(station: Station) -> None:
    add_procedure(station, "syntax_error", "def run(config, name:\n")
    add_procedure(station, "no_info", "VALUE = 1\n")  # neither info nor run
    add_procedure(
        station,
        "wrong_signature",
        "import pydantic\n"
        "from src.types.procedure import ProcedureInfo\n"
        "class C(pydantic.BaseModel):\n    pass\n"
        "def run(config):\n    pass\n"
        "info = ProcedureInfo(run=run, config_model=C)\n",
    )
    config = fast_config()
    config["syntax_error"] = {"anything": 1}  # a broken module's section does not sink the config
    station.write_config(config)

    checked = station.cli("config", "check")
    assert checked.returncode == 1
    assert "src/procedures/syntax_error.py cannot be imported: SyntaxError" in checked.stderr
    assert "src/procedures/no_info.py has no `info = ProcedureInfo(" in checked.stderr
    assert "src/procedures/wrong_signature.py: run must take (config, name)" in checked.stderr
    assert "Traceback" not in checked.stderr + checked.stdout

    started = station.cli("start")
    assert started.returncode == 0, started.stderr
    assert "syntax_error.py cannot be imported" in started.stderr
    assert wait_until(
        lambda: station.status()["processes"].get("dummy_procedure", {}).get("alive", False),
        timeout=30,
    )
    time.sleep(1)
    status = station.status()
    assert status["running"] and "syntax_error" not in status["processes"]
    log = station.cli("logs", "-n", "200").stdout
    assert "procedure syntax_error does not run" in log
    assert station.cli("stop").returncode == 0


def test_a_procedure_without_a_config_section_is_named_and_does_not_run(
    station: Station,
) -> None:
    config = template_config_dict()
    del config["system_checks"]
    station.write_config(config)
    checked = station.cli("config", "check")
    assert checked.returncode == 0
    assert "procedure system_checks has no section in the config" in checked.stderr
