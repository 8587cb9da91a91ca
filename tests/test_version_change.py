"""The gate a new version must pass before a station switches to it
(`pytest -m version_change`, run by the updater in the new version's own venv,
with its own data dir): its config loads, its procedures are discovered, its
queue opens and takes messages, its backends build payloads the servers
accept, and a short station run measures and stops cleanly. They must never
touch the running station: the updater gives them data and root directories
of their own, and they read no config of the station's (so they never connect
to its broker or use its client id)."""

from __future__ import annotations

import json

import pytest

from src import procedures
from src.backend import BACKENDS
from src.backend.provider import pack_rows
from src.backend.tenta_backend import TentaProvider
from src.backend.thingsboard_backend import ThingsBoardProvider
from src.types import Config, DataMessageBody, LogMessageBody
from src.utils.messaging_agent import QUEUE_SCHEMA_VERSION, MessagingAgent
from tests.conftest import Station, template_config_dict, wait_until
from tests.server_rules import check_payload

pytestmark = pytest.mark.version_change


def test_the_template_config_loads_and_every_procedure_module_is_sound() -> None:
    config = Config.load_template()
    assert procedures.PROBLEMS == {}
    assert set(config.enabled_procedure_names()) <= set(procedures.PROCEDURES)


def test_the_queue_opens_migrates_takes_messages_and_gives_them_back() -> None:
    older = MessagingAgent()
    kept = older.add_message(DataMessageBody(data={"written_by": "an older version"}))
    older.connection.execute("PRAGMA user_version = 0")  # the oldest schema there is
    older.close()
    agent = MessagingAgent()
    assert agent.get_schema_version() == QUEUE_SCHEMA_VERSION
    assert [agent.identifier_of(r.id) for r in agent.get_oldest_rows(1)] == [kept]
    agent.remove_messages(r.id for r in agent.get_oldest_rows(1))
    identifiers = agent.add_messages([DataMessageBody(data={"i": i}) for i in range(10)])
    rows = agent.get_oldest_rows(100)
    assert [agent.identifier_of(r.id) for r in rows] == identifiers
    agent.remove_messages(r.id for r in rows)
    assert agent.get_queue_depth() == 0


@pytest.mark.parametrize("provider", ["tenta", "thingsboard"])
def test_each_backend_builds_payloads_its_server_accepts(provider: str) -> None:
    assert provider in BACKENDS
    raw = template_config_dict()
    raw["general"]["system_identifier"] = "8c4f4b5e-2f36-4d3b-9c41-6a1f0e2b7d90"
    raw["backend"] = {"provider": provider, "mqtt_host": "localhost", "mqtt_client_id": "c"}
    config = Config.model_validate(raw)
    agent = MessagingAgent(config)
    agent.add_message(DataMessageBody(data={"co2": 412.5, "label": "A1"}))
    agent.add_message(LogMessageBody(level="ERROR", subject="s", body="b" * 20_000))
    cls = TentaProvider if provider == "tenta" else ThingsBoardProvider
    publishes = pack_rows(cls(config), agent.get_oldest_rows(10), agent.identifier_of)
    assert publishes
    for publish in publishes:
        check_payload(publish.topic, publish.payload())
        assert json.loads(publish.payload())


def test_a_short_station_run_measures_and_stops(station: Station) -> None:
    config = template_config_dict()
    config["dummy_procedure"]["seconds_between_datapoints"] = 1
    config["system_checks"] = None
    station.write_config(config)
    assert station.cli("start").returncode == 0
    agent = MessagingAgent(
        None, station.path("active-message-queue.sqlite3"), station.path("messages")
    )
    try:
        assert wait_until(
            lambda: any(r.variant == "data" for r in agent.get_oldest_rows(100)), timeout=30
        )
    finally:
        agent.close()
    assert station.status()["processes"]["dummy_procedure"]["restarts"] == 0
    assert station.cli("stop").returncode == 0
    assert station.processes() == []
