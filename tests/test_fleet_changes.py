"""Fleet changes as a station's backend receives them, and the operator's
tool against hostile input, in the process: a signed merge patch keeps the
station's secrets and builds on a queued one; a revert takes the kept
config; the unsigned revision on Tenta's topic can neither disagree with a
signed one nor lock a signed change out; the state report masks secrets;
`ivy fleet`'s broker view survives hostile retained messages; its store is
the operator's alone."""

from __future__ import annotations

import json
import os
import stat
import time
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from benchmarks.signing import Signer, make_signer, trust_station
from src import constants
from src.backend.config_receiver import ConfigReceiver
from src.backend.station_reports import station_report
from src.backend.tenta_backend import TentaProvider
from src.fleet.broker import FleetBroker
from src.fleet.commands import printable, view_line
from src.fleet.rollout import next_revision
from src.fleet.store import RolloutStore
from src.fleet.view import view
from src.types import Config, ConfigMessageBody
from src.types.config import BrokerConnection
from src.types.state import ProcessState
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from src.utils.update import config_trial
from src.utils.update.config_history import keep_previous
from src.utils.update.coordinator import RestartWith, UpdateCoordinator
from src.utils.update.signatures import envelope, sign_text, signed_document_text
from tests.conftest import template_config_dict
from tests.mqtt_helpers import publish

pytestmark = pytest.mark.quick

STATION = "4b3c2d1e-0f9a-4b8c-9d7e-6f5a4b3c2d1e"
SECRET = "the-station-password-4711"


@pytest.fixture
def signer(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Signer:
    root = str(tmp_path / "root")
    monkeypatch.setattr(constants, "ROOT_DIR", root)
    key = make_signer(str(tmp_path / "keys"))
    trust_station(root, [key])
    return key


def running_config() -> Config:
    raw = template_config_dict()
    raw["general"]["system_identifier"] = STATION
    raw["general"]["config_revision"] = 5
    raw["backend"] = {
        "provider": "tenta",
        "mqtt_host": "127.0.0.1",
        "mqtt_client_id": "station",
        "mqtt_password": SECRET,
    }
    config = Config.model_validate(raw)
    config.dump()
    return config


def receive(config: Config, revision: Any, configuration: Any) -> list[Any]:
    """Hand one Tenta message to a fresh receiver; return the queued configs."""
    agent = MessagingAgent(config)
    receiver = ConfigReceiver(config, Logger(config, "backend"), agent)
    payload = json.dumps({"revision": revision, "configuration": configuration}).encode()
    received = TentaProvider(config).config_in(f"configurations/{STATION}", payload)
    assert received is not None
    receiver.handle(received, payload)
    return StateInterface.load().pending


def test_a_patch_keeps_the_secrets_and_is_merged_into_the_config_running_when_applied(
    signer: Signer,
) -> None:
    config = running_config()
    first = signer.sign_change(
        {"dummy_procedure": {"seconds_between_datapoints": 7}}, [STATION], "patch"
    )
    (queued,) = receive(config, 6, first)
    merged = queued.config.to_dict()
    assert merged["general"]["config_revision"] == 6
    assert merged["dummy_procedure"]["seconds_between_datapoints"] == 7
    assert merged["backend"]["mqtt_password"] == SECRET
    # a second patch arrives before the first is applied (days away, say)
    receive(config, 7, signer.sign_change({"system_checks": None}, [STATION], "patch"))

    coordinator = UpdateCoordinator(config, Logger(config, "main"), MessagingAgent(config))
    action = coordinator.next_action()
    assert isinstance(action, RestartWith) and action.config.general.config_revision == 6
    assert coordinator.restarting is not None
    config_trial.accept(coordinator.restarting.pending, coordinator.answers)
    after_first = Config.load()
    coordinator = UpdateCoordinator(after_first, Logger(after_first, "main"), MessagingAgent())
    action = coordinator.next_action()
    assert isinstance(action, RestartWith) and action.config.general.config_revision == 7
    latest = json.loads(action.config.to_json(reveal_secrets=True))
    assert latest["dummy_procedure"]["seconds_between_datapoints"] == 7  # not undone
    assert latest.get("system_checks") is None  # null removes it (RFC 7396)
    assert latest["backend"]["mqtt_password"] == SECRET


def test_a_revert_takes_the_kept_config_or_is_refused(signer: Signer, tmp_path: Any) -> None:
    config = running_config()
    assert receive(config, 8, signer.sign_change(3, [STATION], "revert")) == []
    previous = tmp_path / "previous.json"
    older = template_config_dict()
    older["general"]["system_identifier"] = STATION
    older["general"]["config_revision"] = 2
    previous.write_text(json.dumps(older))
    keep_previous(str(previous), 3)
    history = os.path.join(os.path.dirname(constants.CONFIG_PATH), "history", "before-3.json")
    assert stat.S_IMODE(os.stat(history).st_mode) == 0o600
    (queued,) = receive(config, 9, signer.sign_change(3, [STATION], "revert"))
    assert queued.config.general.config_revision == 9
    assert queued.config.to_dict()["backend"] is None  # the kept config, not the running one


def test_the_unsigned_revision_cannot_disagree_or_lock_a_signed_change_out(
    signer: Signer,
) -> None:
    config = running_config()
    text = signed_document_text(
        {"dummy_procedure": {"seconds_between_datapoints": 9}}, [STATION], kind="patch", revision=12
    )
    signed = envelope(text, sign_text(text, signer.private))
    assert receive(config, 13, signed) == []  # another revision than the signed one
    assert receive(config, 2**31, signed) == []  # a revision no config can carry
    (queued,) = receive(config, 12, signed)  # the real message is still taken
    assert queued.config.general.config_revision == 12


def test_a_config_signed_ahead_of_the_clock_waits_and_is_taken_once_the_clock_is_right(
    signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a station that booted a week behind, before NTP: no verdict (a
    # rejection would halt a rollout and be remembered), judged again later
    config = running_config()
    agent = MessagingAgent(config)
    receiver = ConfigReceiver(config, Logger(config, "backend"), agent)
    ahead = time.time() + 7 * 86_400
    text = signed_document_text(
        {"dummy_procedure": {"seconds_between_datapoints": 9}}, [STATION], kind="patch", now=ahead
    )
    change = envelope(text, sign_text(text, signer.private))
    payload = json.dumps({"revision": 6, "configuration": change}).encode()
    received = TentaProvider(config).config_in(f"configurations/{STATION}", payload)
    assert received is not None
    receiver.handle(received, payload)
    receiver.handle(received, payload)  # the same message again: still no verdict
    assert StateInterface.load().pending == []
    bodies = [item.message_body for item in agent.get_n_latest_messages(10)]
    assert not any(isinstance(body, ConfigMessageBody) for body in bodies)  # no answer either
    assert any("cannot be judged yet" in getattr(body, "subject", "") for body in bodies)
    assert receiver.answered == []

    receiver.retry_deferred()  # the clock is still behind
    assert StateInterface.load().pending == []
    monkeypatch.setattr(time, "time", lambda: ahead + 60)  # NTP has caught up
    receiver.deferred_retry_at = 0.0  # a minute later
    receiver.retry_deferred()
    (queued,) = StateInterface.load().pending
    assert queued.config.general.config_revision == 6


def test_the_state_report_masks_secrets(signer: Signer) -> None:
    config = running_config()
    with StateInterface.update() as state:
        state.config_outcomes = []
        state.processes = {
            "dummy_procedure": ProcessState(
                variant="procedure",
                alive=False,
                crash_looping=True,
                last_error=f"ConnectionError: mqtt://station:{SECRET}@broker refused",
            )
        }
    report = station_report(config)
    text = report.model_dump_json()
    assert SECRET not in text
    assert report.station == STATION


def test_hostile_retained_messages_do_not_break_the_operators_view(tmp_path: Any) -> None:
    with Broker.running(str(tmp_path / "broker")) as broker:
        deep = ("[" * 100_000 + "]" * 100_000).encode()
        publish(broker.port, f"ivy/{STATION}/presence", {"online": True, "at": 10**400}, True)
        publish(broker.port, f"acknowledgments/{STATION}", deep)
        publish(broker.port, f"ivy/{STATION}/state", deep, retain=True)
        settings = BrokerConnection(
            mqtt_host="127.0.0.1", mqtt_port=broker.port, mqtt_client_id="operator"
        )
        with FleetBroker(settings, [STATION], session="test") as fleet:
            fleet.settle(2)
            seen = fleet.seen(STATION)
            assert seen.online is True and seen.report is None and seen.answers == []
            fleet.publish_config(STATION, b"{}")  # still working
            assert fleet.seen(STATION).retained_config == b"{}"


def test_a_forged_report_cannot_crash_the_view_or_use_up_the_revisions(tmp_path: Any) -> None:
    genuine: dict[str, Any] = {
        "station": STATION,
        "version": "1.0.0",
        "config_revision": 5,
        "running": True,
        "healthy": True,
        "backlog": 0,
        "reported_at": 1_700_000_000.0,
    }
    forged: list[dict[str, Any]] = [
        {"reported_at": 1e300},  # gmtime() overflowed; "heard" for ever
        {"backlog": -1},
        {"problems": ["x" * 100_000]},
        {"last_config": {"revision": 5, "status": "accepted", "at": 1e300}},
    ]
    with Broker.running(str(tmp_path / "broker")) as broker:
        settings = BrokerConnection(
            mqtt_host="127.0.0.1", mqtt_port=broker.port, mqtt_client_id="operator"
        )
        publish(broker.port, f"ivy/{STATION}/presence", {"online": False}, True)
        for change in forged:
            publish(broker.port, f"ivy/{STATION}/state", {**genuine, **change}, True)
            with FleetBroker(settings, [STATION]) as fleet:
                fleet.settle(2)
                seen = fleet.seen(STATION)
                assert seen.report is None, change
                assert view_line(view(STATION, seen)) == f"{STATION}  unreachable"
        not_a_number = json.dumps({**genuine, "reported_at": float("nan")})  # Python writes NaN
        publish(broker.port, f"ivy/{STATION}/state", not_a_number.encode(), True)
        with FleetBroker(settings, [STATION]) as fleet:
            fleet.settle(2)
            assert fleet.seen(STATION).report is None
    # a report of a revision near the end of the range (2**31 - 1) cannot
    # use the revisions up: one of 2**30 or more is not followed, and no
    # revision a station uses is taken (an old answer could pass for it)
    assert next_revision(7, {5, 6}) == 8
    assert next_revision(7, {5, 8, 9}) == 10
    for high in (2**31 - 2, 2**31 - 1, 2**30):
        assert next_revision(7, {5, high}) == 8
    assert next_revision(2**30 - 1, {2**31 - 2}) == 2**30
    revision = 7
    for _ in range(3):  # rollout after rollout, the forged report stays
        found = next_revision(revision, {2**31 - 2})
        assert found == revision + 1
        revision = found
    assert next_revision(2**31 - 1, set()) is None


def test_the_operators_store_and_terminal_are_safe(tmp_path: Any) -> None:
    store = RolloutStore(str(tmp_path / "state" / "fleet.sqlite3"))
    store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "fleet.sqlite3").st_mode) == 0o600
    assert printable("rejected\x1b[2J\x07 now") == "rejected?[2J? now"
