"""The shared state file under concurrent writers, and corrupt files."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from src import constants
from src.utils.state_interface import StateInterface

pytestmark = pytest.mark.quick


def _increment(times: int) -> None:
    for _ in range(times):
        with StateInterface.update() as state:
            state.dummy_procedure.last_value = (state.dummy_procedure.last_value or 0) + 1


def test_concurrent_updates_lose_nothing() -> None:
    context = multiprocessing.get_context("fork")  # children keep the patched paths
    workers = [context.Process(target=_increment, args=(500,)) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    assert StateInterface.load().dummy_procedure.last_value == 4000


def test_failed_update_writes_nothing() -> None:
    with StateInterface.update() as state:
        state.dummy_procedure.last_value = 1.0
    with pytest.raises(RuntimeError), StateInterface.update() as state:
        state.dummy_procedure.last_value = 2.0
        raise RuntimeError("boom")
    assert StateInterface.load().dummy_procedure.last_value == 1.0
    leftovers = [f for f in os.listdir(constants.DATA_DIR) if f.startswith(".state.json")]
    assert leftovers == []


def test_corrupt_file_is_moved_aside_logged_and_replaced() -> None:
    with open(constants.STATE_PATH, "w") as f:
        f.write('{"mainloop": {"pid": "not a number"')
    state = StateInterface.load()
    assert state.mainloop.pid is None
    aside = [f for f in os.listdir(constants.DATA_DIR) if f.startswith("state.json.corrupt-")]
    assert len(aside) == 1
    with open(os.path.join(constants.DATA_DIR, aside[0])) as f:
        assert "not a number" in f.read()  # the evidence is kept
    logs = os.listdir(constants.LOGS_DIR)
    with open(os.path.join(constants.LOGS_DIR, logs[0])) as f:
        assert "state file could not be read and was moved to" in f.read()
    with StateInterface.update() as s:
        s.mainloop.pid = 5
    assert StateInterface.load().mainloop.pid == 5


def test_unknown_keys_from_another_version_are_ignored() -> None:
    with open(constants.STATE_PATH, "w") as f:
        f.write('{"mainloop": {"pid": 7}, "a_future_field": [1, 2]}')
    assert StateInterface.load().mainloop.pid == 7
