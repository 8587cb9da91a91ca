"""The main loop: supervise one child per procedure and per backend, apply
pending configs, flush the archive, enforce retention, and tear everything
down in order (procedures first, backends last, so that the backend drains what
the procedures produced) on SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import json
import multiprocessing.connection
import os
import signal
import time
from types import FrameType

from src import backend, constants, procedures
from src.types import Config, ConfigMessageBody
from src.types.config import destination_process_name
from src.utils.functions import capped_exponential_delay, delete_expired_dated_files
from src.utils.lifecycle_manager import LifecycleManager, teardown_in_parallel
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from src.utils.systemd_notify import notify, watchdog
from src.utils.update import HandOver, RestartWith, UpdateCoordinator, remove_stale_staging
from src.utils.update.trust import TrustError, load_policy, summary

_MAX_WAIT_SECONDS = 0.5
_ARCHIVE_FLUSH_INTERVAL = 2.0
_HEARTBEAT_INTERVAL = 10.0
_DROP_REPORT_INTERVAL = 60.0
_RETENTION_INTERVAL = 3600.0
# short: a failed iteration also postpones restarting dead children
_MAX_ERROR_BACKOFF = 30.0


class Mainloop:
    """The state of one main loop run."""

    def __init__(self, config: Config) -> None:
        """Prepare; nothing is started yet. Called by `run`."""
        self.config = config
        self.logger = Logger(config, "main")
        self.messaging_agent = MessagingAgent(config)
        self.updater = UpdateCoordinator(config, self.logger, self.messaging_agent)
        self.managers: list[LifecycleManager] = []
        self.stop_requested = False
        self.last_run: dict[str, float] = {}
        self.reported_dropped = self.messaging_agent.get_dropped_count()
        self.published_status: str | None = None
        self.destinations_pending_release = False
        # the version to hand over to once torn down (run.py starts it)
        self.handover_to: str | None = None

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def _due(self, task: str, interval: float, now: float) -> bool:
        if now - self.last_run.get(task, -float("inf")) < interval:
            return False
        self.last_run[task] = now
        return True

    def start_children(self) -> None:
        """Start one supervised child per enabled procedure and per backend."""
        self.managers = []
        for name in self.config.enabled_procedure_names():
            if name in procedures.PROCEDURES:
                run = procedures.PROCEDURES[name].run
                self.managers.append(
                    LifecycleManager(self.config, run, name, "procedure", self.logger)
                )
            else:
                self.logger.error(
                    f"procedure {name} does not run", details=procedures.PROBLEMS.get(name)
                )
        for destination, section in self.config.destinations().items():
            self.managers.append(
                LifecycleManager(
                    self.config,
                    backend.BACKENDS[section.provider],
                    destination_process_name(destination),
                    "backend",
                    self.logger,
                )
            )
        for manager in self.managers:
            manager.start_procedure()

    def sync_destinations(self) -> None:
        """Register the config's destinations in the queue (each keeps its own
        rows, cap and counters). A destination no longer configured is
        released, its rows no longer kept for it, only once the config that
        dropped it is accepted: a config rolled back brings it back with its
        rows. Called before the children start, and when a trial ends."""
        on_trial = self.updater.on_trial()
        released = self.messaging_agent.sync_destinations(
            self.config.destination_routes(), release_others=not on_trial
        )
        self.destinations_pending_release = on_trial
        for name, count in sorted(released.items()):
            if count:
                self.logger.warning(
                    f"destination {name} is no longer configured: {count} message(s) it had "
                    "not got are no longer kept for it (the daily archive has them)"
                )

    def stop_children(self) -> None:
        """Procedures first, then backends, each group in parallel."""
        teardown_in_parallel([m for m in self.managers if m.variant == "procedure"])
        teardown_in_parallel([m for m in self.managers if m.variant == "backend"])
        self.managers = []

    def run(self) -> str | None:
        """Run until SIGTERM or SIGINT, or until a software update is ready,
        then tear down; return the version to hand over to, if any."""
        try:
            return self._run()
        except BaseException as e:
            # the children must not outlive a main loop that failed: a process
            # waiting for them at exit holds the lock, and no restart by cron
            # or systemd could take over (found by the chaos harness)
            self.logger.exception(e, "the main loop failed; stopping its children")
            with contextlib.suppress(Exception):
                self.stop_children()
            raise

    def _run(self) -> str | None:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.logger.info(
            f"starting Ivy {constants.VERSION.root} with config revision "
            f"{self.config.general.config_revision} (pid {os.getpid()})"
        )
        for name in remove_stale_staging():
            self.logger.info(f"removed {name}, left by an update that was interrupted")
        if self.config.migration_notice:
            self.logger.warning(f"config/config.json is {self.config.migration_notice}")
        self._announce_trust()
        self.updater.at_start()
        self._acknowledge_startup()
        self.sync_destinations()
        self.start_children()
        notify("READY=1")
        with StateInterface.update() as state:
            state.mainloop.pid = os.getpid()
            state.mainloop.started_at = time.time()
            state.mainloop.last_heartbeat = time.time()

        consecutive_errors = 0
        while not self.stop_requested:
            try:
                self.iterate()
                consecutive_errors = 0
            except Exception as e:
                consecutive_errors += 1
                delay = capped_exponential_delay(consecutive_errors, 1.0, _MAX_ERROR_BACKOFF)
                self.logger.exception(e, f"main loop iteration failed; retrying in {delay:.0f} s")
                self._sleep_unless_stopped(delay)
                continue
            self._wait_for_next_event()

        self.updater.cancel()
        self.logger.info("stopping: tearing down procedures, then backends")
        self.stop_children()
        self.messaging_agent.flush_archive()
        with StateInterface.update() as state:
            state.mainloop.pid = None
            for process_state in state.processes.values():
                process_state.alive = False
                process_state.pid = None
        self.logger.info("stopped")
        return self.handover_to

    def iterate(self) -> None:
        """One pass: restart dead children, apply pending configs, periodic work."""
        watchdog()
        for manager in self.managers:
            manager.supervise()
        self._carry_out(self.updater.next_action())
        if self.destinations_pending_release and not self.updater.on_trial():
            self.sync_destinations()
        now = time.monotonic()  # intervals must not stretch when the wall clock is stepped
        if self._due("archive", _ARCHIVE_FLUSH_INTERVAL, now):
            self.messaging_agent.flush_archive()
        if self._due("retention", _RETENTION_INTERVAL, now):
            self._enforce_retention()
        if self._due("dropped", _DROP_REPORT_INTERVAL, now):
            self._report_dropped_messages()
        self._publish_status(heartbeat=self._due("heartbeat", _HEARTBEAT_INTERVAL, now))

    def _wait_for_next_event(self) -> None:
        timeout = _MAX_WAIT_SECONDS
        for manager in self.managers:
            due = manager.seconds_until_next_start()
            if due is not None:
                timeout = min(timeout, due)
        sentinels = [s for s in (m.sentinel() for m in self.managers) if s is not None]
        sentinels += self.updater.sentinels()
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout=timeout)
        else:
            time.sleep(timeout)

    def _sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            time.sleep(min(_MAX_WAIT_SECONDS, deadline - time.monotonic()))

    def _acknowledge_startup(self) -> None:
        revealed = json.loads(self.config.to_json(reveal_secrets=True))
        self.messaging_agent.add_message(ConfigMessageBody.about("startup", revealed))

    def _announce_trust(self) -> None:
        try:
            lines = summary(load_policy())
        except TrustError as e:
            lines = [f"the trust policy cannot be read, so no remote config is taken: {e}"]
        for line in lines:
            (self.logger.warning if line.isupper() or "no trust" in line else self.logger.info)(
                f"trust: {line}"
            )

    def _carry_out(self, action: RestartWith | HandOver | None) -> None:
        """Do what the updater asked: restart the children with a config (the
        updater's trial starts watching in between), or stop to hand over."""
        if isinstance(action, RestartWith):
            self.stop_children()
            self.reconfigure(action.config)
            self.sync_destinations()
            self.updater.children_stopped()
            self.start_children()
        elif isinstance(action, HandOver):
            self.handover_to = action.version
            self.stop_requested = True

    def reconfigure(self, config: Config) -> None:
        """Use `config` from now on: a new logger, messaging agent (the new
        revision and size cap) and updater, the old ones closed. Called after
        an accepted config, with the children stopped."""
        self.logger.close()
        self.messaging_agent.close()
        self.config = config
        self.logger = Logger(config, "main")
        self.messaging_agent = MessagingAgent(config)
        self.updater.use(config, self.logger, self.messaging_agent)

    def _enforce_retention(self) -> None:
        days = self.config.storage.retention_days
        for directory in (constants.MESSAGE_ARCHIVE_DIR, constants.LOGS_DIR):
            deleted = delete_expired_dated_files(directory, days)
            if deleted:
                self.logger.info(
                    f"deleted {len(deleted)} file(s) older than {days} days from {directory}"
                )

    def _report_dropped_messages(self) -> None:
        dropped = self.messaging_agent.get_dropped_count()
        if dropped > self.reported_dropped:
            self.logger.warning(
                f"the queue hit its cap of {self.config.storage.max_queued_messages} messages: "
                f"dropped the {dropped - self.reported_dropped} oldest since the last report "
                f"({dropped} in all)"
            )
            self.reported_dropped = dropped

    def _publish_status(self, heartbeat: bool) -> None:
        statuses = {m.name: m.status() for m in self.managers}
        serialized = json.dumps({k: v.model_dump() for k, v in statuses.items()}, sort_keys=True)
        if serialized == self.published_status and not heartbeat:
            return
        with StateInterface.update() as state:
            state.processes = statuses
            state.mainloop.pid = os.getpid()
            state.mainloop.last_heartbeat = time.time()
        self.published_status = serialized


def run(config: Config | None = None) -> str | None:
    """Run the main loop in this process until it is told to stop (with the
    given config, or `config/config.json`); return the version to hand over
    to when it stopped for a software update. Called by run.py, which holds
    the single-instance lock and starts that version once it has released it."""
    return Mainloop(config or Config.load()).run()
