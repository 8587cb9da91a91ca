"""Durability with real processes: writers killed with -9 lose no accepted
message, concurrent state updates lose no change."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from src.procedures.dummy_procedure import DummyProcedureState
from src.types import State
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from tests.conftest import PROJECT_DIR

pytestmark = pytest.mark.integration


def walk(state: State) -> DummyProcedureState:
    return state.procedure_state("dummy_procedure", DummyProcedureState)


def _increment(times: int) -> None:
    for _ in range(times):
        with StateInterface.update() as state:
            walk(state).last_value = (walk(state).last_value or 0) + 1


def test_concurrent_updates_lose_nothing() -> None:
    context = multiprocessing.get_context("fork")  # children keep the patched paths
    workers = [context.Process(target=_increment, args=(500,)) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    assert walk(StateInterface.load()).last_value == 4000


def test_every_returned_add_survives_kill_9(data_dir: str) -> None:
    """A writer process prints each identifier once add_message returned; it is
    killed -9 mid-stream. Every printed identifier must be in the queue and in
    the archive."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {PROJECT_DIR!r})
        from src.types import DataMessageBody
        from src.utils.messaging_agent import MessagingAgent
        agent = MessagingAgent(None, {os.path.join(data_dir, "q.sqlite3")!r},
                               {os.path.join(data_dir, "archive")!r})
        i = 0
        while True:
            identifier = agent.add_message(DataMessageBody(data={{"i": i}}))
            print(identifier, flush=True)
            i += 1
        """
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    accepted: list[str] = []
    for line in writer.stdout:
        accepted.append(line.strip())
        if len(accepted) == 300:
            break
    time.sleep(0.2)  # let it run on, so the kill lands in the middle of an add
    os.kill(writer.pid, signal.SIGKILL)
    rest, _ = writer.communicate(timeout=30)
    accepted += [line for line in rest.split("\n") if line.strip()]

    paths = (os.path.join(data_dir, "q.sqlite3"), os.path.join(data_dir, "archive"))
    agent = MessagingAgent(None, *paths)
    queued = {agent.identifier_of(r.id) for r in agent.get_oldest_rows(1_000_000)}
    missing_from_queue = [i for i in accepted if i not in queued]
    agent.flush_archive()
    archived: set[str] = set()
    for name in os.listdir(paths[1]):
        archived |= {
            m.message_identifier for m in MessagingAgent.load_message_archive(name[:10], *paths)
        }
    missing_from_archive = [i for i in accepted if i not in archived]
    print(f"accepted {len(accepted)}, queued {len(queued)}, archived {len(archived)}")
    assert len(accepted) >= 300
    assert missing_from_queue == []
    assert missing_from_archive == []
