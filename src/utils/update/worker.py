"""The worker process of a software update: the main loop forks it and keeps
supervising (procedures go on measuring) while the worker fetches, verifies,
installs and tests the new version (`steps.perform_update`, each step with its
own timeout). The worker dies with the main loop (a `kill -9` of the main loop
leaves no update running), and the main loop kills a worker that outlives the
sum of the step timeouts. The result comes back through a pipe.
Started and polled by the main loop's updater only."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from dataclasses import dataclass

from src.types import Config
from src.types.state import PendingConfig, UpdateProgress

from ..logger import Logger
from ..messaging_agent import MessagingAgent
from ..parent_death import die_with_parent
from ..state_interface import StateInterface
from .answers import Answers
from .steps import (
    CONFIG_CHECK_TIMEOUT_SECONDS,
    INSTALL_TIMEOUT_SECONDS,
    TESTS_TIMEOUT_SECONDS,
    perform_update,
)

_CONTEXT = multiprocessing.get_context("fork")
# download (git, bounded), install, config check, tests, slack
JOB_TIMEOUT_SECONDS = (
    600.0 + INSTALL_TIMEOUT_SECONDS + CONFIG_CHECK_TIMEOUT_SECONDS + TESTS_TIMEOUT_SECONDS + 60.0
)


@dataclass(frozen=True)
class UpdateOutcome:
    """How an update job stands: `finished` once the worker is gone;
    `failure` is None when every step passed, else the reason."""

    finished: bool
    failure: str | None = None


def _worker(
    config: Config,
    pending: PendingConfig,
    result: multiprocessing.connection.Connection,
    parent_pid: int,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    die_with_parent(parent_pid)
    logger = Logger(config, "updater")
    agent = MessagingAgent(config)
    try:
        perform_update(pending, Answers(logger, agent), logger)
        result.send(None)
    except Exception as e:
        result.send(str(e) or type(e).__name__)
    finally:
        agent.close()
        logger.close()


@dataclass
class UpdateJob:
    """One running update worker."""

    pending: PendingConfig
    process: multiprocessing.process.BaseProcess
    result: multiprocessing.connection.Connection
    started_monotonic: float  # the job's time limit is not moved by a stepped wall clock

    @staticmethod
    def start(config: Config, pending: PendingConfig) -> UpdateJob:
        """Fork the worker for `pending` and note the update in the state
        (`ivy status` shows it)."""
        now = time.time()
        with StateInterface.update() as state:
            state.update_in_progress = UpdateProgress(
                version=pending.config.general.software_version.root,
                config_revision=pending.config.general.config_revision,
                step="starting",
                started_at=now,
                step_started_at=now,
            )
        receiver, sender = _CONTEXT.Pipe(duplex=False)
        process = _CONTEXT.Process(
            target=_worker,
            args=(config, pending, sender, os.getpid()),
            name="ivy-update",
            daemon=False,
        )
        process.start()
        sender.close()
        return UpdateJob(pending, process, receiver, time.monotonic())

    def sentinel(self) -> int:
        """Becomes ready when the worker ends."""
        return self.process.sentinel

    def outcome(self) -> UpdateOutcome:
        """Not finished while the worker runs; then finished, with the
        failure when a step failed, the worker died, or it ran past
        `JOB_TIMEOUT_SECONDS` (then it is killed)."""
        if self.process.is_alive():
            if time.monotonic() - self.started_monotonic < JOB_TIMEOUT_SECONDS:
                return UpdateOutcome(finished=False)
            self.cancel()
            return UpdateOutcome(True, f"the update took longer than {JOB_TIMEOUT_SECONDS:.0f} s")
        failure: str | None
        try:
            failure = self.result.recv() if self.result.poll() else "no result"
        except (EOFError, OSError):
            failure = "no result"
        if failure == "no result":
            failure = f"the update worker died (exit code {self.process.exitcode})"
        self._finish()
        return UpdateOutcome(True, failure)

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


def forget_interrupted_update(logger: Logger) -> None:
    """At the start of a main loop: an update noted in the state was cut off
    (its worker died with the previous main loop). Nothing of it was switched
    to, and it was not marked handled, so the same config is tried again when
    it next arrives."""
    with StateInterface.update() as state:
        interrupted = state.update_in_progress
        state.update_in_progress = None
    if interrupted is not None:
        logger.warning(
            f"the update to version {interrupted.version} (config revision "
            f"{interrupted.config_revision}) was interrupted at step {interrupted.step}; "
            "it is tried again when the config next arrives"
        )
