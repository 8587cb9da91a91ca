"""The worker process of a software update: the main loop forks it and keeps
supervising (procedures go on measuring) while the worker downloads, installs
and tests the new version (`Updater.perform_update`, each step with its own
timeout). The worker dies with the main loop (a `kill -9` of the main loop
leaves no update running), and the main loop kills a worker that outlives the
sum of the step timeouts. The result comes back through a pipe.
Started and polled by the main loop only."""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from dataclasses import dataclass

from src.types import Config, ForeignConfig
from src.types.state import UpdateProgress

from ..logger import Logger
from ..messaging_agent import MessagingAgent
from ..state_interface import StateInterface
from ..updater import (
    CONFIG_CHECK_TIMEOUT_SECONDS,
    INSTALL_TIMEOUT_SECONDS,
    TESTS_TIMEOUT_SECONDS,
    Updater,
)

_CONTEXT = multiprocessing.get_context("fork")
_PR_SET_PDEATHSIG = 1
# download (git or tarball, both bounded), install, config check, tests, slack
JOB_TIMEOUT_SECONDS = (
    600.0 + INSTALL_TIMEOUT_SECONDS + CONFIG_CHECK_TIMEOUT_SECONDS + TESTS_TIMEOUT_SECONDS + 60.0
)


def _worker(
    config: Config, foreign_config: ForeignConfig, result: multiprocessing.connection.Connection
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    logger = Logger(config, "updater")
    agent = MessagingAgent(config)
    try:
        Updater(config, logger, agent).perform_update(foreign_config)
        result.send(None)
    except Exception as e:
        result.send(str(e) or type(e).__name__)
    finally:
        agent.close()
        logger.close()


@dataclass
class UpdateJob:
    """One running update worker."""

    foreign_config: ForeignConfig
    process: multiprocessing.process.BaseProcess
    result: multiprocessing.connection.Connection
    started_monotonic: float  # the job's time limit is not moved by a stepped wall clock

    @staticmethod
    def start(config: Config, foreign_config: ForeignConfig) -> UpdateJob:
        """Fork the worker for `foreign_config` and note the update in the
        state (`ivy status` shows it)."""
        now = time.time()
        with StateInterface.update() as state:
            state.update_in_progress = UpdateProgress(
                version=foreign_config.general.software_version.root,
                config_revision=foreign_config.general.config_revision,
                step="starting",
                started_at=now,
                step_started_at=now,
            )
        receiver, sender = _CONTEXT.Pipe(duplex=False)
        process = _CONTEXT.Process(
            target=_worker, args=(config, foreign_config, sender), name="ivy-update", daemon=False
        )
        process.start()
        sender.close()
        return UpdateJob(foreign_config, process, receiver, time.monotonic())

    def sentinel(self) -> int:
        """Becomes ready when the worker ends."""
        return self.process.sentinel

    def outcome(self) -> tuple[bool, str | None]:
        """(finished, failure): (False, None) while the worker runs; then
        (True, None) when every step passed, (True, reason) when one failed,
        the worker died, or it ran past `JOB_TIMEOUT_SECONDS` (then it is
        killed)."""
        if self.process.is_alive():
            if time.monotonic() - self.started_monotonic < JOB_TIMEOUT_SECONDS:
                return False, None
            self.cancel()
            return True, f"the update took longer than {JOB_TIMEOUT_SECONDS:.0f} s"
        failure: str | None
        try:
            failure = self.result.recv() if self.result.poll() else "no result"
        except (EOFError, OSError):
            failure = "no result"
        if failure == "no result":
            failure = f"the update worker died (exit code {self.process.exitcode})"
        self._finish()
        return True, failure

    def cancel(self) -> None:
        """Kill the worker (its commands die with it). Called on teardown."""
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)
        self._finish()

    def _finish(self) -> None:
        self.result.close()
        with StateInterface.update() as state:
            state.update_in_progress = None
