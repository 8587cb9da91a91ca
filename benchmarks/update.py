"""Benchmark `update`, on a production root made by `ivy setup` (see
`benchmarks.production`):

- seconds from `ivy config apply` of a same-version config to the procedures
  running with it, side by side with `ivy restart` (what a restart by cron
  costs at the least, before cron's own wait of up to a minute);
- a full version update with a warm package cache, from `ivy config apply` to
  the new version's main loop running, broken down by step (from the step
  acknowledgements), side by side with `pdm sync` of the same lock into a new
  venv with PDM's own warm cache;
- the disk a second version's venv takes beyond the files it shares (uv's
  hardlinks) with the cache and the first venv;
- from the switch to a release that crashes at import until the version
  before it runs again and has answered the config (three starts, rollback).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

from src.utils.messaging_agent import MessagingAgent

from .common import Figure
from .production import (
    CRASHES_AT_IMPORT,
    GOOD,
    TOOLS,
    ProductionStation,
    make_releases,
    set_up_station,
)

_BENCHMARK = "update"


def _processes_restarted_after(station: ProductionStation, moment: float) -> bool:
    processes = station.state().get("processes", {})
    dummy = processes.get("dummy_procedure", {})
    return bool(dummy.get("alive")) and (dummy.get("started_at") or 0) > moment


def _wait(condition: object, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.02)
    raise RuntimeError("the station did not get there in time")


def _reconfigure_seconds(station: ProductionStation, revision: int) -> float:
    path = station.config_file(f"same-{revision}.json", station.pointed_version(), revision)
    with open(path) as f:
        config = json.load(f)
    config["dummy_procedure"]["seconds_between_datapoints"] = 1 + revision % 2
    with open(path, "w") as f:
        json.dump(config, f)
    started = time.time()
    result = station.cli("config", "apply", path, "--wait", "0")
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    _wait(lambda: _processes_restarted_after(station, started), 60)
    return time.time() - started


def _restart_seconds(station: ProductionStation) -> float:
    started = time.time()
    result = station.cli("restart")
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    _wait(lambda: _processes_restarted_after(station, started), 60)
    return time.time() - started


def _pdm_sync_seconds(lock_directory: str, scratch: str) -> float:
    """`pdm sync` of the same groups into a new venv; the second of two runs,
    so that PDM's cache is as warm as uv's."""
    project = os.path.join(scratch, "pdm-sync")
    os.makedirs(project, exist_ok=True)
    for name in ("pyproject.toml", "pdm.lock"):
        shutil.copy(os.path.join(lock_directory, name), project)
    environment = {**os.environ, "PDM_CHECK_UPDATE": "false", "PDM_IGNORE_ACTIVE_VENV": "1"}
    pdm = os.path.join(TOOLS, "bin", "pdm")
    seconds = 0.0
    for _ in range(2):
        venv = os.path.join(project, ".venv")
        shutil.rmtree(venv, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run(["python3", "-m", "venv", "--without-pip", venv], check=True)
        subprocess.run(
            [pdm, "use", "-q", "-f", os.path.join(venv, "bin", "python")],
            cwd=project,
            env=environment,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [pdm, "sync", "-q", "-G", "gate", "--no-self"],
            cwd=project,
            env=environment,
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - started
    return seconds


def _unshared_bytes(directory: str) -> tuple[int, int]:
    """(bytes only this tree holds, bytes it shows): a file with another
    hardlink (uv's cache, another venv) costs nothing more."""
    unshared = shown = 0
    for folder, _, files in os.walk(directory):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            shown += st.st_size
            if st.st_nlink == 1:
                unshared += st.st_blocks * 512
    return unshared, shown


def _step_seconds(station: ProductionStation, revision: int) -> dict[str, float]:
    agent = MessagingAgent(
        None,
        os.path.join(station.root, "data", "active-message-queue.sqlite3"),
        os.path.join(station.root, "data", "messages"),
    )
    try:
        steps = {}
        for row in agent.get_oldest_rows(100_000):
            body = json.loads(row.body)
            if (
                body.get("variant") == "config"
                and body.get("config_revision") == revision
                and body.get("step_seconds") is not None
            ):
                steps[body["step"]] = float(body["step_seconds"])
        return steps
    finally:
        agent.close()


def _rollback_figure(station: ProductionStation) -> Figure:
    """From the switch to a release that crashes at import until the version
    before it runs again and has answered: the guard's three starts of the
    candidate, the rollback, and the old main loop's start."""
    path = station.config_file("crashes.json", CRASHES_AT_IMPORT, 200)
    journal_path = os.path.join(station.root, "data", "update-journal.json")
    result = station.cli("config", "apply", path, "--wait", "0")
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    switched_at = None
    deadline = time.time() + 600
    while time.time() < deadline:
        with open(journal_path) as f:
            candidate = json.load(f).get("candidate")
        if candidate is not None:
            switched_at = float(candidate["switched_at"])
        outcomes = [
            o for o in station.state().get("config_outcomes", []) if o["config_revision"] == 200
        ]
        if outcomes and switched_at is not None:
            if outcomes[-1]["status"] != "rejected":
                raise RuntimeError(f"expected a rollback, got {outcomes[-1]}")
            return Figure(
                _BENCHMARK,
                "crashing_candidate_to_previous_running_s",
                float(outcomes[-1]["at"]) - switched_at,
                "s",
            )
        time.sleep(0.05)
    raise RuntimeError("no rollback within 600 s")


def run(quick: bool) -> Iterator[Figure]:
    """Apply-to-running, a full update by step, and the second venv's disk."""
    scratch = tempfile.mkdtemp(prefix="ivy-bench-update-")
    try:
        releases = make_releases(os.path.join(scratch, "releases"))
        cache = os.path.join(scratch, "uv-cache")
        station = set_up_station(os.path.join(scratch, "root"), releases, cache)
        try:
            if station.cli("start").returncode != 0:
                raise RuntimeError("the station did not start")
            rounds = 1 if quick else 3
            ours = [_reconfigure_seconds(station, revision) for revision in range(1, rounds + 1)]
            restarts = [_restart_seconds(station) for _ in range(rounds)]
            yield Figure(
                _BENCHMARK,
                "config_apply_to_procedures_running_s",
                min(ours),
                "s",
                "ivy restart",
                min(restarts),
            )

            path = station.config_file("update.json", GOOD, 100)
            started = time.time()
            result = station.cli("config", "apply", path, "--wait", "600", timeout=700)
            if result.returncode != 0 or "accepted" not in result.stdout:
                raise RuntimeError(result.stdout + result.stderr)
            total = time.time() - started
            steps = _step_seconds(station, 100)
            pdm_sync = _pdm_sync_seconds(os.path.join(station.root, GOOD), scratch)
            yield Figure(_BENCHMARK, "version_update_total_s", total, "s")
            # from the tests passing to the new main loop's acceptance
            yield Figure(
                _BENCHMARK, "version_update_switch_and_handover_s", total - sum(steps.values()), "s"
            )
            for step, seconds in steps.items():
                baseline = ("pdm sync", pdm_sync) if step == "install" else (None, None)
                yield Figure(_BENCHMARK, f"version_update_{step}_s", seconds, "s", *baseline)
            yield _rollback_figure(station)
            unshared, shown = _unshared_bytes(os.path.join(station.root, GOOD, ".venv"))
            yield Figure(
                _BENCHMARK,
                "second_venv_unshared_MiB",
                unshared / 2**20,
                "MiB",
                "the same venv's apparent size",
                shown / 2**20,
            )
        finally:
            station.cli("stop")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
