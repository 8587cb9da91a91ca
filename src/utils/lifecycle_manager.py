"""Run one procedure or backend as a supervised child process.

Children are forked, so a restart costs milliseconds. In the child, the parent's
signal handlers are replaced, and the kernel is asked to kill the child when
the main loop dies (so a `kill -9` of the main loop leaves no orphan behind).
A child that dies is restarted with capped exponential backoff; the count of
consecutive crashes resets once a child has run for `stable_seconds`.
"""

from __future__ import annotations

import gc
import inspect
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Literal

from src import constants
from src.types import Config, ProcessState

from .functions import capped_exponential_delay
from .logger import Logger
from .parent_death import die_with_parent

_CONTEXT = multiprocessing.get_context("fork")
_HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT}

ProcedureTarget = Callable[[Config, str], None]
BackendTarget = Callable[[Config, str, multiprocessing.synchronize.Event], None]


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _child_entrypoint(
    variant: Literal["procedure", "backend"],
    target: Callable[..., None],
    args: tuple[object, ...],
    parent_pid: int,
    error_pipe: multiprocessing.connection.Connection,
) -> None:
    # the parent's handlers would start a second teardown inside the child;
    # the signals stayed blocked from before the fork until they are replaced
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if variant == "procedure":
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    else:
        # a backend stops through its teardown indicator, draining first
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)
    die_with_parent(parent_pid)
    try:
        target(*args)
    except SystemExit:
        raise
    except BaseException as e:
        error_pipe.send(f"{type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
        raise SystemExit(1) from None


class LifecycleManager:
    """Starts, watches, restarts and stops one child. Used by the main loop only."""

    def __init__(
        self,
        config: Config,
        entrypoint: ProcedureTarget | BackendTarget,
        name: str,
        variant: Literal["procedure", "backend"],
        logger: Logger | None = None,
        first_restart_delay: float = 0.25,
        max_restart_delay: float = 60.0,
        stable_seconds: float = 60.0,
        crash_loop_threshold: int = 3,
    ) -> None:
        """Prepare (but do not start) the child. Raise ValueError when the
        entrypoint's signature does not fit the variant: a procedure takes
        (config, name), a backend (config, name, teardown_indicator). Called by
        the main loop."""
        expected = 2 if variant == "procedure" else 3
        try:
            parameters = len(inspect.signature(entrypoint).parameters)
        except (TypeError, ValueError):
            parameters = -1
        if parameters != expected:
            raise ValueError(
                f"{name}: a {variant} entrypoint takes {expected} arguments, "
                f"{getattr(entrypoint, '__qualname__', entrypoint)!s} takes {parameters}"
            )
        self.name = name
        self.variant: Literal["procedure", "backend"] = variant
        self.target = entrypoint
        self.config = config
        self.logger = logger or Logger(config, "main")
        self.first_restart_delay = first_restart_delay
        self.max_restart_delay = max_restart_delay
        self.stable_seconds = stable_seconds
        self.crash_loop_threshold = crash_loop_threshold

        self.teardown_indicator: multiprocessing.synchronize.Event = _CONTEXT.Event()
        self.process: multiprocessing.process.BaseProcess | None = None
        self.error_reader: multiprocessing.connection.Connection | None = None
        self.started_at: float | None = None  # unix time, for status and health
        # durations and schedules use the monotonic clock: a wall clock stepped
        # back by NTP would otherwise postpone a restart by the step
        self.started_monotonic: float | None = None
        self.restarts = 0
        self.consecutive_crashes = 0
        self.crash_loop_reported = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.next_start_at: float | None = None
        self.tearing_down = False

    def start_procedure(self) -> None:
        """Start the child; RuntimeError when it runs already."""
        if self.is_alive():
            raise RuntimeError(f"{self.name} is running already")
        self._fork()

    def procedure_is_running(self) -> bool:
        """Whether the child was started (and not torn down); does not check
        that it is still alive (see `is_alive`)."""
        return self.process is not None and not self.tearing_down

    def check_procedure_status(self, now: float | None = None) -> None:
        """Notice a child that died: record and log why, and schedule its
        restart with backoff (`now`: `time.monotonic()`). RuntimeError when it
        was never started."""
        if self.process is None:
            raise RuntimeError(f"{self.name} has not been started")
        if not self.tearing_down and not self.process.is_alive() and self.next_start_at is None:
            self._record_crash(time.monotonic() if now is None else now)

    def _fork(self) -> None:
        reader, writer = _CONTEXT.Pipe(duplex=False)
        args: tuple[object, ...] = (
            (self.config, self.name, self.teardown_indicator)
            if self.variant == "backend"
            else (self.config, self.name)
        )
        self.process = _CONTEXT.Process(
            target=_child_entrypoint,
            args=(self.variant, self.target, args, os.getpid(), writer),
            name=f"{constants.NAME}-{self.name}",
            daemon=False,
        )
        # the child's collector then never walks the objects inherited from the
        # main loop, so their pages stay shared instead of being copied
        gc.freeze()
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)
        writer.close()
        self.error_reader = reader
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self.next_start_at = None

    def is_alive(self) -> bool:
        """Whether the child runs right now."""
        return self.process is not None and self.process.is_alive()

    def sentinel(self) -> int | None:
        """A handle that becomes ready when the child exits, for
        `multiprocessing.connection.wait` in the main loop."""
        return self.process.sentinel if self.is_alive() and self.process else None

    def supervise(self, now: float | None = None) -> None:
        """Check the child and restart it once its backoff has passed. Called
        by the main loop on every iteration."""
        now = time.monotonic() if now is None else now
        if self.tearing_down or self.process is None:
            return
        self.check_procedure_status(now)
        if self.next_start_at is not None and now >= self.next_start_at:
            self.restarts += 1
            self._fork()

    def seconds_until_next_start(self, now: float | None = None) -> float | None:
        """How long until a scheduled restart is due; None when none is."""
        if self.next_start_at is None:
            return None
        return max(0.0, self.next_start_at - (time.monotonic() if now is None else now))

    def _record_crash(self, now: float) -> None:
        assert self.process is not None
        self.process.join()
        exitcode = self.process.exitcode
        error = self._read_error()
        if error is None:
            if exitcode is not None and exitcode < 0:
                error = f"killed by signal {signal.Signals(-exitcode).name}"
            else:
                error = f"exited with code {exitcode}"
        self.last_error = error
        self.last_error_at = time.time()

        ran_for = now - (self.started_monotonic or now)
        if ran_for >= self.stable_seconds:
            if self.crash_loop_reported:
                self.logger.info(f"{self.name} had run stably before this crash; backoff reset")
            self.consecutive_crashes = 0
            self.crash_loop_reported = False
        self.consecutive_crashes += 1
        delay = capped_exponential_delay(
            self.consecutive_crashes, self.first_restart_delay, self.max_restart_delay
        )
        self.next_start_at = now + delay

        if self.consecutive_crashes < self.crash_loop_threshold:
            self.logger.warning(
                f"{self.name} stopped unexpectedly ({error}); restarting in {delay:.2f} s"
            )
        elif not self.crash_loop_reported:
            self.crash_loop_reported = True
            self.logger.error(
                f"{self.name} is crash-looping ({self.consecutive_crashes} crashes in a row, "
                f"last: {error}); restarting with backoff up to {self.max_restart_delay:.0f} s, "
                "further crashes are not logged until it runs stably"
            )

    def _read_error(self) -> str | None:
        reader = self.error_reader
        if reader is None:
            return None
        try:
            return str(reader.recv()) if reader.poll() else None
        except (EOFError, OSError):
            return None
        finally:
            reader.close()
            self.error_reader = None

    def request_teardown(self) -> None:
        """Ask the child to stop: SIGTERM for a procedure, the teardown indicator
        for a backend (which then drains). Does not wait."""
        self.tearing_down = True
        self.next_start_at = None
        if not self.is_alive() or self.process is None:
            return
        if self.variant == "procedure":
            self.process.terminate()
        else:
            self.teardown_indicator.set()

    def teardown_deadline_seconds(self) -> float:
        """How long the child may take to stop before it is killed."""
        if self.variant == "backend":
            return backend_teardown_seconds(self.config)
        return float(constants.SECONDS_PER_GRACEFUL_PROCEDURE_TEARDOWN)

    def teardown(self) -> None:
        """Stop the child: SIGTERM for a procedure, the teardown indicator for
        a backend (which drains first); SIGKILL when it has not stopped within
        its deadline."""
        self.request_teardown()
        self.finish_teardown(time.monotonic() + self.teardown_deadline_seconds())

    def finish_teardown(self, deadline: float) -> None:
        """Wait for the child until `deadline` (`time.monotonic()`), then SIGKILL it."""
        if self.process is None:
            return
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.logger.warning(f"{self.name} did not stop in time; killing it")
            self.process.kill()
            self.process.join()
        if self.error_reader is not None:
            self.error_reader.close()
            self.error_reader = None

    def status(self) -> ProcessState:
        """What `ivy status` shows for this child."""
        alive = self.is_alive()
        return ProcessState(
            variant=self.variant,
            pid=self.process.pid if (self.process is not None and alive) else None,
            alive=alive,
            restarts=self.restarts,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            crash_looping=self.crash_loop_reported,
            started_at=self.started_at if alive else None,
        )


def backend_teardown_seconds(config: Config) -> float:
    """How long a backend may drain on teardown before it is killed: the
    longest `max_drain_time` of the destinations + 15 s. Used by the lifecycle
    manager and `ivy stop`."""
    drains = [section.max_drain_time for section in config.destinations().values()]
    return float(max(drains, default=0) + 15)


def teardown_in_parallel(managers: Sequence[LifecycleManager]) -> None:
    """Stop several children at once, each within its own deadline. Called by
    the main loop, first for the procedures, then for the backends."""
    now = time.monotonic()
    for manager in managers:
        manager.request_teardown()
    for manager in managers:
        manager.finish_teardown(now + manager.teardown_deadline_seconds())
