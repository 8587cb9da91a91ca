"""The shared state file under concurrent writers, and corrupt files."""

from __future__ import annotations

import datetime
import os

import pydantic
import pytest

from src import constants
from src.procedures.dummy_procedure import DummyProcedureState
from src.types import State
from src.utils.state_interface import StateInterface

pytestmark = pytest.mark.quick


def walk(state: State) -> DummyProcedureState:
    return state.procedure_state("dummy_procedure", DummyProcedureState)


def test_failed_update_writes_nothing() -> None:
    with StateInterface.update() as state:
        walk(state).last_value = 1.0
    with pytest.raises(RuntimeError), StateInterface.update() as state:
        walk(state).last_value = 2.0
        raise RuntimeError("boom")
    assert walk(StateInterface.load()).last_value == 1.0
    leftovers = [f for f in os.listdir(constants.DATA_DIR) if f.startswith(".state.json")]
    assert leftovers == []


@pytest.mark.parametrize(
    "content",
    [
        b'{"mainloop": {"pid": "not a number"',
        # found by the chaos harness: bytes that are not UTF-8 made every reader
        # of the state raise, and the station could not even start
        b'{"mainloop": {"pid": \x00\xff not a number',
    ],
)
def test_corrupt_file_is_moved_aside_logged_and_replaced(content: bytes) -> None:
    with open(constants.STATE_PATH, "wb") as f:
        f.write(content)
    state = StateInterface.load()
    assert state.mainloop.pid is None
    aside = [f for f in os.listdir(constants.DATA_DIR) if f.startswith("state.json.corrupt-")]
    assert len(aside) == 1
    with open(os.path.join(constants.DATA_DIR, aside[0]), "rb") as kept:
        assert kept.read() == content  # the evidence is kept
    logs = os.listdir(constants.LOGS_DIR)
    with open(os.path.join(constants.LOGS_DIR, logs[0])) as log:
        assert "state file could not be read and was moved to" in log.read()
    with StateInterface.update() as s:
        s.mainloop.pid = 5
    assert StateInterface.load().mainloop.pid == 5


def test_a_corrupt_file_keeps_the_replay_guards_it_still_holds() -> None:
    # lost, every old signed config would be new to the station again
    with open(constants.STATE_PATH, "wb") as f:
        f.write(
            b'{"mainloop": {"pid": "x"}, "newest_signed_config_at": 1800000000.5, '
            b'"highest_handled_config_revision": 41, "config_outcomes": [{"trunc'
        )
    state = StateInterface.load()
    assert state.mainloop.pid is None
    assert state.newest_signed_config_at == 1_800_000_000.5
    assert state.highest_handled_config_revision == 41
    with open(constants.STATE_PATH, "wb") as f:
        f.write(b'{"newest_signed_config_at": 1e999, "highest_handled_config_revision": 2e40')
    state = StateInterface.load()  # nothing that would not validate is kept
    assert state.newest_signed_config_at is None and state.highest_handled_config_revision is None


def test_unknown_keys_from_another_version_are_ignored() -> None:
    with open(constants.STATE_PATH, "w") as f:
        f.write('{"mainloop": {"pid": 7}, "a_future_field": [1, 2]}')
    assert StateInterface.load().mainloop.pid == 7


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic warns about the bad value too
def test_a_wrong_type_is_refused_at_the_writer_and_the_file_stays_intact() -> None:
    with StateInterface.update() as state:
        walk(state).last_value = 1.5
    before = open(constants.STATE_PATH).read()
    with pytest.raises(pydantic.ValidationError, match="last_value") as info:
        with StateInterface.update() as state:
            walk(state).last_value = "high"  # type: ignore[assignment]
    assert "high" in str(info.value)  # the value, for the writer
    # a mutation that bypasses assignment validation is caught before writing
    with pytest.raises(ValueError, match="rejected_config_revisions"):
        with StateInterface.update() as state:
            state.rejected_config_revisions.append("x")  # type: ignore[arg-type]
    assert open(constants.STATE_PATH).read() == before
    assert walk(StateInterface.load()).last_value == 1.5


def test_the_reference_example_of_a_datetime_works() -> None:
    now = datetime.datetime.now()
    with StateInterface.update() as state:
        state.system.last_boot_time = now
    assert StateInterface.load().system.last_boot_time == pytest.approx(now.timestamp())


def test_at_most_three_corrupt_copies_are_kept() -> None:
    for i in range(5):  # older copies, as a station corrupting its state often would have
        with open(os.path.join(constants.DATA_DIR, f"state.json.corrupt-20200101T00000{i}"), "w"):
            pass
    with open(constants.STATE_PATH, "w") as f:
        f.write("{broken")
    StateInterface.load()
    aside = sorted(f for f in os.listdir(constants.DATA_DIR) if f.startswith("state.json.corrupt-"))
    assert len(aside) == 3
    assert aside[:2] == ["state.json.corrupt-20200101T000003", "state.json.corrupt-20200101T000004"]
    with open(os.path.join(constants.DATA_DIR, aside[2])) as f:
        assert f.read() == "{broken"  # the newest evidence is kept
