"""The chaos run: start a station, inject faults in an order drawn from a
seed (every kind once, then at random until the duration is over), bring the
world back, let the station deliver what it still holds, and count."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .broker import ChaosBroker, wait_for
from .observers import Recorder, Sampler
from .report import build_report, read_records
from .station import (
    BACKEND_LONGEST_BACKOFF_S,
    FAILOVER_PROBE_S,
    PRODUCERS,
    STATION_IDENTIFIER,
    TENTA_DESTINATION,
    THINGSBOARD_DESTINATION,
    ChaosStation,
)

# Paho's longest reconnect delay in the backend (src/backend/mqtt_connection.py)
RECOVERY_TIMEOUT_S = 90
BROKER_FAULTS = ("broker_blip", "broker_outage", "broker_amnesia", "queue_cap")
# faults that run in the background while the station works on
BACKGROUND_FAULTS = (*BROKER_FAULTS, "failover", "second_destination_outage")
FAULT_KINDS = (
    "kill_procedure",
    "kill_backend",
    "kill_main",
    *BACKGROUND_FAULTS,
    "corrupt_state",
    "truncated_archive",
    "full_disk",
    "config_burst",
    "clock_steps",
)


@dataclass
class Settings:
    """What one run does."""

    seed: int = 11
    duration_s: float = 100.0  # of injecting faults; the final drain comes on top
    messages_per_second: float = 100.0
    max_queued_messages: int = 1_000
    faults: tuple[str, ...] = FAULT_KINDS
    sample_interval_s: float = 2.0
    data_tmpfs_mib: int = 64


@dataclass
class Run:
    """The parts of one run and what happened in it."""

    settings: Settings
    station: ChaosStation
    broker: ChaosBroker  # the Tenta destination's primary address
    failover_broker: ChaosBroker  # its failover address
    monitoring_broker: ChaosBroker  # the ThingsBoard destination's
    recorder: Recorder  # Tenta, on the primary and the failover broker
    monitoring_recorder: Recorder
    sampler: Sampler
    rng: random.Random
    started: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)
    outages: list[dict[str, Any]] = field(default_factory=list)  # each names its destination
    failovers: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    broker_thread: threading.Thread | None = None

    def at(self) -> float:
        """Seconds since the run started."""
        return round(time.monotonic() - self.started, 2)


def _producers_progress(station: ChaosStation) -> list[int]:
    sizes = []
    for producer in PRODUCERS:
        try:
            sizes.append(os.path.getsize(os.path.join(station.record_dir, f"{producer}.record")))
        except OSError:
            sizes.append(0)
    return sizes


def wait_recovered(run: Run) -> float:
    """Seconds until the main loop, both backends and both producers run again
    and each producer has recorded new messages; a problem when they do not
    within RECOVERY_TIMEOUT_S."""
    began = time.monotonic()
    before = _producers_progress(run.station)
    expected = {"main", "backend", f"backend:{THINGSBOARD_DESTINATION}", *PRODUCERS}

    def recovered() -> bool:
        roles = run.station.processes()
        growing = all(
            now > then for now, then in zip(_producers_progress(run.station), before, strict=True)
        )
        return expected <= set(roles) and growing

    try:
        wait_for(recovered, RECOVERY_TIMEOUT_S, "the station to recover")
    except RuntimeError as e:
        run.problems.append(f"{run.at()} s: {e} (processes: {sorted(run.station.processes())})")
    return round(time.monotonic() - began, 2)


# --- faults --------------------------------------------------------------------


def kill_role(run: Run, roles: list[str]) -> dict[str, Any]:
    """SIGKILL one process of the given roles, chosen by the seed."""
    found = run.station.processes()
    present = [role for role in roles if role in found]
    if not present:
        return {"skipped": f"none of {roles} running"}
    role = run.rng.choice(sorted(present))
    with contextlib.suppress(ProcessLookupError):
        os.kill(found[role].pid, signal.SIGKILL)
    return {"killed": role, "pid": found[role].pid}


def kill_main(run: Run) -> dict[str, Any]:
    """SIGKILL the main loop (its children follow it), then `ivy start` after a
    pause, as cron would."""
    killed = kill_role(run, ["main"])
    wait_for(lambda: run.station.main_process() is None, 30, "the main loop to die")
    time.sleep(run.rng.uniform(0.5, 3.0))
    run.station.start()
    return killed


def _broker_down(run: Run, kind: str, seconds: float) -> None:
    """The Tenta destination's broker service is down: its primary and its
    failover address (amnesia: only the primary restarts, without its
    persistence, while the failover address stays up)."""
    down = run.at()
    amnesia = kind == "broker_amnesia"
    stopped = [run.broker] if amnesia else [run.broker, run.failover_broker]
    for broker in stopped:
        broker.stop()
    time.sleep(seconds)
    if amnesia:
        count = run.recorder.subscription_count()
        run.broker.restart_without_persistence(lambda: run.recorder.subscription_count() > count)
    else:
        for broker in stopped:
            broker.start()
    run.outages.append(
        {
            "kind": kind,
            "destination": TENTA_DESTINATION,
            "down_at_s": down,
            "seconds": round(seconds, 1),
            "back": time.monotonic(),
        }
    )


def _monitoring_down(run: Run, seconds: float) -> None:
    down = run.at()
    run.monitoring_broker.stop()
    time.sleep(seconds)
    run.monitoring_broker.start()
    run.outages.append(
        {
            "kind": "second_destination_outage",
            "destination": THINGSBOARD_DESTINATION,
            "down_at_s": down,
            "seconds": round(seconds, 1),
            "back": time.monotonic(),
        }
    )


def _primary_down(run: Run, seconds: float) -> None:
    """Stop only the Tenta destination's primary address: the backend must go
    to the failover address, and back to the primary once it returns."""
    primary = f"127.0.0.1:{run.broker.port}"
    secondary = f"127.0.0.1:{run.failover_broker.port}"
    began = time.monotonic()
    run.broker.stop()
    on_secondary_after: float | None = None
    while time.monotonic() - began < seconds:
        if on_secondary_after is None and run.station.address_in_use(TENTA_DESTINATION) == (
            secondary
        ):
            on_secondary_after = round(time.monotonic() - began, 2)
        time.sleep(0.1)
    run.broker.start()
    returned = time.monotonic()
    try:
        wait_for(
            lambda: run.station.address_in_use(TENTA_DESTINATION) == primary,
            RECOVERY_TIMEOUT_S,
            "the Tenta backend to go back to its primary address",
        )
        back_after: float | None = round(time.monotonic() - returned, 2)
    except RuntimeError as e:
        run.problems.append(f"{run.at()} s: {e}")
        back_after = None
    if on_secondary_after is None:
        run.problems.append(
            f"{run.at()} s: the primary was down {seconds:.1f} s and the Tenta backend "
            "never used its failover address"
        )
    run.failovers.append(
        {
            "primary_down_s": round(seconds, 1),
            "on_failover_address_after_s": on_secondary_after,
            "back_on_primary_after_s": back_after,
        }
    )


def background_fault(run: Run, kind: str) -> dict[str, Any]:
    """Start a broker fault in the background (one at a time): the Tenta
    destination's broker service down for a blip of a few seconds, for longer
    than the backend's longest backoff, restarted without persistence, or long
    enough for the producers to fill the queue past its cap; only its primary
    address down (failover and back); or the ThingsBoard destination's broker
    down long enough to fill that destination's cap."""
    cap_filled = 1.5 * run.settings.max_queued_messages / run.settings.messages_per_second
    seconds = {
        "broker_blip": run.rng.uniform(2, 6),
        "broker_outage": BACKEND_LONGEST_BACKOFF_S + run.rng.uniform(5, 10),
        "broker_amnesia": run.rng.uniform(2, 6),
        "queue_cap": cap_filled,
        "failover": 4 * FAILOVER_PROBE_S + run.rng.uniform(4, 8),
        "second_destination_outage": cap_filled,
    }[kind]
    wait_broker_up(run)
    if kind == "failover":
        target = functools.partial(_primary_down, run, seconds)
    elif kind == "second_destination_outage":
        target = functools.partial(_monitoring_down, run, seconds)
    else:
        target = functools.partial(_broker_down, run, kind, seconds)
    run.broker_thread = threading.Thread(target=target, daemon=True)
    run.broker_thread.start()
    return {"broker_down_s": round(seconds, 1)}


def wait_broker_up(run: Run) -> None:
    """Wait for a background fault to end and for each recorder to have got
    everything produced before then that its destination's cap did not drop
    (so that the next outage starts with the backlog delivered: the
    oldest-first check tells outages apart by arrivals, and the next outage's
    delivery delay is its own); then for the Tenta backend to be on its
    primary address (where configs are published)."""
    if run.broker_thread is not None:
        run.broker_thread.join()
        run.broker_thread = None
        ended = time.monotonic()
        try:
            wait_for(
                lambda: _delivered_all_but_dropped(run, ended),
                RECOVERY_TIMEOUT_S,
                "the backlog to reach the recorders",
            )
        except RuntimeError as e:
            run.problems.append(f"{run.at()} s: {e}")
    primary = f"127.0.0.1:{run.broker.port}"
    with contextlib.suppress(RuntimeError):
        wait_for(
            lambda: run.station.address_in_use(TENTA_DESTINATION) == primary,
            RECOVERY_TIMEOUT_S,
            "the Tenta backend on its primary address",
        )


def _delivered_all_but_dropped(run: Run, before: float) -> bool:
    """Whether, for each destination, at most as many messages produced
    before `before` (monotonic) are missing at its recorder as its cap has
    dropped."""
    counts = run.station.queue_counts()
    if counts is None:
        return False
    dropped = counts[1]
    produced = [key for key, at in read_records(run.station.record_dir)[0].items() if at < before]
    for name, recorder in (
        (TENTA_DESTINATION, run.recorder),
        (THINGSBOARD_DESTINATION, run.monitoring_recorder),
    ):
        with recorder.lock:
            missing = sum(1 for key in produced if key not in recorder.arrivals)
        if missing > dropped[name]:
            return False
    return True


def corrupt_state(run: Run) -> dict[str, Any]:
    """Overwrite state.json with bytes that are not JSON."""
    path = os.path.join(run.station.data_dir, "state.json")
    with open(path, "wb") as f:
        f.write(b'{"mainloop": {"pid": \x00\xff garbage')
    return {"path": "state.json"}


def truncated_archive(run: Run) -> dict[str, Any]:
    """Kill the main loop and leave the newest archive file ending in half a
    line, as a power loss during an append does (the line's rows are not
    marked archived, so the station writes them again), then start again."""
    killed = kill_role(run, ["main"])
    wait_for(lambda: run.station.main_process() is None, 30, "the main loop to die")
    directory = os.path.join(run.station.data_dir, "messages")
    archives = sorted(
        (os.path.join(directory, name) for name in os.listdir(directory)), key=os.path.getmtime
    )
    torn = b""
    if archives:
        with open(archives[-1], "rb+") as f:
            lines = f.read().splitlines()
            torn = lines[-1][: len(lines[-1]) // 2] if lines else b'{"identifier":"'
            f.write(torn)
    run.station.start()
    return {**killed, "torn_bytes": len(torn)}


def full_disk(run: Run) -> dict[str, Any]:
    """Fill the data directory's tmpfs, hold it full for a few seconds, free it."""
    if not run.station.mounted:
        return {"skipped": run.station.full_disk_unavailable}
    ballast = os.path.join(run.station.data_dir, "ballast")
    chunk = b"\0" * 2**16
    try:
        # unbuffered: a buffered close would flush into the full disk, raise
        # ENOSPC and leave the disk full for the rest of the run
        with open(ballast, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        held = run.rng.uniform(4, 8)
        time.sleep(held)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(ballast)
    return {"held_full_s": round(held, 1)}


def _publish(port: int, messages: list[tuple[str, bytes, bool]]) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="chaos-ops")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload, retain in messages:
            client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(20)
    finally:
        client.disconnect()
        client.loop_stop()


def config_burst(run: Run) -> dict[str, Any]:
    """Under load, publish hostile configs on the config topic, signed by the
    operator or not: garbage, invalid signed configs, an unsigned one with the
    largest revision (once a lock-out), a replay of an older signed config;
    then one valid signed config, which must be accepted; then send that one
    and the invalid one again: neither may be answered again."""
    wait_broker_up(run)
    topic = f"configurations/{STATION_IDENTIFIER}"
    station = run.station
    current = station.revision
    valid = dict(station.config)

    def envelope(revision: Any, configuration: Any, sign: bool = True) -> bytes:
        if sign and isinstance(configuration, dict):
            configuration = station.operator.sign(configuration)
        return json.dumps({"revision": revision, "configuration": configuration}).encode()

    broken = envelope(current + 1, {**valid, "storage": {"max_queued_messages": -5}})
    hostile = [
        b"\xff\xfe not json",
        b"[1, 2, 3]",
        b'{"revision": "seven", "configuration": {}}',
        envelope(current + 1, "a string"),
        envelope(2**40, valid),
        broken,
        envelope(current + 1, {**valid, "surprise": True}),
        envelope(2**31 - 1, valid, sign=False),  # once a remote lock-out
        envelope(current + 1, valid, sign=False),
        json.dumps(
            {"revision": current, "configuration": station.operator.sign(valid, now=1_000.0)}
        ).encode(),  # an old signed config, replayed
        b"{" * 100_000,
    ]
    messages = [(topic, payload, run.rng.random() < 0.5) for payload in hostile]
    run.rng.shuffle(messages)
    station.revision = current + 2
    accepted_config = envelope(station.revision, valid)
    messages.append((topic, accepted_config, True))
    sent = time.monotonic()
    _publish(run.broker.port, messages)
    try:
        wait_for(
            lambda: run.recorder.accepted_at(station.revision) is not None,
            120,
            f"config revision {station.revision} to be accepted",
        )
    except RuntimeError as e:
        run.problems.append(f"{run.at()} s: {e}")
    accepted = run.recorder.accepted_at(station.revision)
    answers = run.recorder.answer_count()
    _publish(run.broker.port, [(topic, broken, False), (topic, accepted_config, True)])
    time.sleep(5)
    replays_answered = run.recorder.answer_count() - answers
    if replays_answered:
        run.problems.append(f"{run.at()} s: {replays_answered} replayed config(s) answered")
    return {
        "hostile": len(hostile),
        "valid_revision": station.revision,
        "accepted_after_s": round(accepted - sent, 2) if accepted else None,
        "replays_answered": replays_answered,
    }


def clock_steps(run: Run) -> dict[str, Any]:
    """Step the station's wall clock an hour back, then an hour ahead of real
    time, then back to real time. Right before the step back a producer is
    killed: its restart, scheduled just before the step, must not wait for
    the clock to catch up."""
    killed = kill_role(run, list(PRODUCERS))
    time.sleep(0.05)  # the main loop notices the death and schedules the restart
    run.station.set_clock_offset(-3600.0)
    before = _producers_progress(run.station)
    hold = run.rng.uniform(5, 10)
    began = time.monotonic()
    restarted_after: float | None = None
    while time.monotonic() - began < hold:
        now = _producers_progress(run.station)
        if restarted_after is None and all(a > b for a, b in zip(now, before, strict=True)):
            restarted_after = round(time.monotonic() - began, 2)
        time.sleep(0.1)
    if restarted_after is None:
        run.problems.append(
            f"{run.at()} s: a producer killed as the clock stepped back stayed down"
        )
    run.station.set_clock_offset(3600.0)
    time.sleep(run.rng.uniform(5, 10))
    run.station.set_clock_offset(0.0)
    return {**killed, "offsets_s": [-3600.0, 3600.0, 0.0], "restarted_after_s": restarted_after}


def _kill_procedure(run: Run) -> dict[str, Any]:
    return kill_role(run, list(PRODUCERS))


def _kill_backend(run: Run) -> dict[str, Any]:
    return kill_role(run, ["backend", f"backend:{THINGSBOARD_DESTINATION}"])


FAULTS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "kill_procedure": _kill_procedure,
    "kill_backend": _kill_backend,
    "kill_main": kill_main,
    "corrupt_state": corrupt_state,
    "truncated_archive": truncated_archive,
    "full_disk": full_disk,
    "config_burst": config_burst,
    "clock_steps": clock_steps,
    **{kind: functools.partial(background_fault, kind=kind) for kind in BACKGROUND_FAULTS},
}


def _inject(run: Run, kind: str) -> None:
    at = run.at()
    began = time.monotonic()
    try:
        details = FAULTS[kind](run)
    except Exception as e:  # the harness's own trouble is reported, not hidden
        details = {"error": f"{type(e).__name__}: {e}"}
        run.problems.append(f"{at} s: {kind} failed: {e}")
    event = {"kind": kind, "at_s": at, "took_s": round(time.monotonic() - began, 2), **details}
    if kind not in BACKGROUND_FAULTS and "skipped" not in details:
        event["recovered_after_s"] = wait_recovered(run)
    run.events.append(event)
    print(json.dumps(event), flush=True)


def _drain_and_stop(run: Run) -> None:
    """Bring everything back, stop the producers (a restart with their sections
    removed) and let the backend send what is queued."""
    wait_broker_up(run)
    run.station.set_clock_offset(0.0)
    run.station.stop()
    quiet = {**run.station.config, **dict.fromkeys(PRODUCERS)}
    quiet["general"] = {**quiet["general"], "config_revision": run.station.revision}
    run.station.write_config(quiet)
    run.station.start()
    try:
        wait_for(lambda: (run.station.queue_counts() or (1, {}))[0] == 0, 300, "an empty queue")
    except RuntimeError as e:
        run.problems.append(f"final drain: {e}")
    run.sampler.sample()
    run.station.stop()
    time.sleep(2)  # the last PUBLISHes reach the recorder


def run_chaos(settings: Settings, scratch: str | None = None) -> dict[str, Any]:
    """One whole run; the report (see `report.build_report`)."""
    kept = scratch is not None
    with contextlib.ExitStack() as stack:
        if scratch is None:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="ivy-chaos-"))
        brokers = []
        for name in ("broker", "failover-broker", "monitoring-broker"):
            broker = ChaosBroker(os.path.join(scratch, name))
            broker.start()
            stack.callback(broker.stop)
            brokers.append(broker)
        primary, failover, monitoring = brokers
        recorder = Recorder([primary.recorder_port, failover.recorder_port], "tenta")
        stack.callback(recorder.close)
        monitoring_recorder = Recorder([monitoring.recorder_port], "thingsboard")
        stack.callback(monitoring_recorder.close)
        station = ChaosStation(
            os.path.join(scratch, "station"),
            (primary.port, failover.port, monitoring.port),
            settings.messages_per_second,
            settings.max_queued_messages,
            settings.data_tmpfs_mib,
        )
        stack.callback(station.unmount)
        if kept:  # the data directory's tmpfs goes with the run: keep a copy
            stack.callback(
                shutil.copytree, station.data_dir, station.data_dir + "-kept", dirs_exist_ok=True
            )
        stack.callback(_kill_everything, station)
        station.start()
        sampler = Sampler(station, settings.sample_interval_s)
        run = Run(
            settings,
            station,
            primary,
            failover,
            monitoring,
            recorder,
            monitoring_recorder,
            sampler,
            random.Random(settings.seed),
        )
        first_pass = list(settings.faults)
        run.rng.shuffle(first_pass)
        deadline = run.started + settings.duration_s
        while first_pass or time.monotonic() < deadline:
            time.sleep(run.rng.uniform(1.0, 4.0))
            kind = first_pass.pop() if first_pass else run.rng.choice(settings.faults)
            _inject(run, kind)
        _drain_and_stop(run)
        samples = sampler.stop()
        if kept:  # what each recorder saw, to look into a report afterwards
            _save_arrivals(run, scratch)
        return build_report(run, samples)
    raise AssertionError("not reached")


def _save_arrivals(run: Run, scratch: str) -> None:
    """Write each recorder's first arrivals (incarnation seq monotonic_seconds),
    and the outages with their monotonic times, into the kept scratch dir."""
    for name, recorder in (
        (TENTA_DESTINATION, run.recorder),
        (THINGSBOARD_DESTINATION, run.monitoring_recorder),
    ):
        with recorder.lock, open(os.path.join(scratch, f"arrivals-{name}.txt"), "w") as f:
            for (incarnation, seq), at in sorted(recorder.arrivals.items()):
                f.write(f"{incarnation} {seq} {at:.3f}\n")
    with open(os.path.join(scratch, "outages.json"), "w") as f:
        json.dump(run.outages, f)


def _kill_everything(station: ChaosStation) -> None:
    for process in station.processes().values():
        with contextlib.suppress(Exception):
            process.kill()
