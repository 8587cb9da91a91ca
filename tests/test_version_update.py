"""Software updates end to end, on a production root made by `ivy setup` in a
temporary directory, from real git repositories (and a GitLab stand-in over
HTTPS) holding releases of this very checkout with bumped versions. Offline
but for the package registry (uv's cache is shared by the tests)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import threading
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from benchmarks.production import (
    BASE,
    BROKEN_TESTS,
    GOOD,
    ProductionStation,
    Releases,
    git,
    set_version,
    sign_tag,
    station_config,
)
from benchmarks.signing import make_signer
from tests.conftest import wait_until
from tests.git_server import GitServerState, git_https_server
from tests.mqtt_helpers import make_certificates, publish
from tests.production_fixtures import (
    ConnectedStation,
    apply,
    archived_data_identifiers,
    delivered_data_identifiers,
    start,
)

pytestmark = [pytest.mark.integration, pytest.mark.updater]


def test_setup_then_a_same_version_config_applies_in_place(
    production_station: ProductionStation,
) -> None:
    station = production_station
    assert station.pointed_version() == BASE
    assert os.path.isfile(os.path.join(station.root, BASE, ".venv", "bin", "python"))
    for next_step in ("ivy-cli.sh start", "ivy-cli.sh boot systemd", "ivy-cli.sh boot cron"):
        assert next_step in station.setup_output
    boot = station.cli("boot", "systemd").stdout
    assert f"ExecStart={station.pointer} run" in boot
    assert "Type=notify" in boot and "WatchdogSec=" in boot and "Restart=always" in boot
    start(station)
    pid = station.state()["mainloop"]["pid"]
    path = station.config_file("same-version.json", BASE, 1, dummy_procedure=None)
    result = apply(station, path, wait=60)
    assert result.returncode == 0 and "accepted" in result.stdout, result.stdout + result.stderr
    assert wait_until(lambda: set(station.state().get("processes", {})) == set(), timeout=30)
    assert station.state()["mainloop"]["pid"] == pid  # reconfigured in place
    again = apply(station, path, wait=5)
    assert again.returncode == 1 and "general.config_revision: 1 is not newer" in again.stderr
    assert station.cli("stop").returncode == 0


def test_an_update_over_mqtt_switches_hands_over_and_delivers_every_message_once(
    connected_station: ConnectedStation,
    releases: Releases,
    broker: Broker,
) -> None:
    station, backend, subscriber = (
        connected_station.station,
        connected_station.backend,
        connected_station.subscriber,
    )
    old_pids = {p.pid for p in station.processes()}

    def answers() -> list[dict[str, Any]]:
        return [
            item["values"]
            for item in subscriber.items("v1/devices/me/telemetry")
            if item["values"].get("config_revision") == 5
            and item["values"]["config_status"] != "startup"
        ]

    assert wait_until(lambda: len(delivered_data_identifiers(subscriber.items())) >= 3, timeout=60)
    new_config = station_config(releases, GOOD, 5)
    new_config["backend"] = backend
    signed = releases.config_key.sign_text(new_config)
    publish(broker.port, "v1/devices/me/attributes", {"configuration": signed})

    def updated() -> bool:
        return any(a.get("sw_state") == "UPDATED" for a in answers())

    assert wait_until(updated, timeout=300, interval=0.5), answers()
    assert station.pointed_version() == GOOD
    assert station.running_versions() == {GOOD}
    mainloop = station.state()["mainloop"]["pid"]
    assert mainloop in old_pids  # the same process, now running the new version
    assert os.path.isfile(os.path.join(station.root, GOOD, ".venv", "bin", "python"))
    assert os.path.isfile(os.path.join(station.root, BASE, ".venv", "bin", "python"))
    steps = [(a["config_status"], a.get("config_step"), a.get("sw_state")) for a in answers()]
    assert steps == [
        ("received", None, "DOWNLOADING"),
        ("progress", "space", None),
        ("progress", "download", "DOWNLOADED"),
        ("progress", "install", None),
        ("progress", "configure", None),
        ("progress", "tests", "VERIFIED"),
        ("progress", "switch", "UPDATING"),
        ("accepted", None, "UPDATED"),
    ], steps
    timed = [a for a in answers() if a.get("config_step") not in (None, "switch")]
    assert len(timed) == 5 and all(a["config_step_seconds"] >= 0 for a in timed)
    startups = [
        item["values"]
        for item in subscriber.items("v1/devices/me/telemetry")
        if item["values"].get("config_status") == "startup"
    ]
    # the old version, the candidate on trial, then the committed version
    assert [s["current_sw_version"] for s in startups] == [BASE, GOOD, GOOD]

    before_stop = len(delivered_data_identifiers(subscriber.items()))
    assert wait_until(
        lambda: len(delivered_data_identifiers(subscriber.items())) >= before_stop + 3, timeout=60
    )
    assert station.cli("stop").returncode == 0
    assert station.processes() == []
    archived = archived_data_identifiers(station.root)
    received = delivered_data_identifiers(subscriber.items())
    assert len(archived) == len(set(archived)) > 10
    assert wait_until(
        lambda: set(delivered_data_identifiers(subscriber.items())) == set(archived), 30
    )
    received = delivered_data_identifiers(subscriber.items())
    assert sorted(received) == sorted(archived), "lost or duplicated across the switch"


def test_a_version_whose_gate_tests_fail_is_rejected_and_the_old_one_runs_on(
    production_station: ProductionStation,
) -> None:
    station = production_station
    start(station)
    pids = {p.pid for p in station.processes()}
    broken = station.config_file("broken.json", BROKEN_TESTS, 3)
    assert apply(station, broken, wait=0).returncode == 0
    # a config that arrives during the update waits for it, then applies
    assert wait_until(lambda: station.state().get("update_in_progress") is not None, timeout=60)
    later = station.config_file("later.json", BASE, 4, system_checks=None, dummy_procedure=None)
    result = apply(station, later)
    assert result.returncode == 0 and "accepted" in result.stdout, result.stdout + result.stderr
    outcomes = [(o["config_revision"], o["status"]) for o in station.state()["config_outcomes"]]
    assert outcomes == [(3, "rejected"), (4, "accepted")]
    result = station.cli("update", "status")
    assert result.returncode == 0, result.stderr
    rejection = json.loads(result.stdout)["config_outcomes"][0]["reason"]
    assert rejection.startswith("the update to")
    assert "failed at tests" in rejection and "release broken on purpose" in rejection
    assert station.pointed_version() == BASE
    assert station.running_versions() == {BASE}
    assert station.state()["mainloop"]["pid"] in pids  # the same main loop
    assert not os.path.exists(os.path.join(station.root, BROKEN_TESTS))
    assert [n for n in os.listdir(station.root) if n.startswith(".staging")] == []
    assert station.cli("stop").returncode == 0


TOKEN = "glpat-secret-token-123"


@pytest.mark.parametrize("step", ["download", "install", "tests"])
def test_kill_9_of_the_main_loop_during_a_step_leaves_the_old_version_and_a_retry_succeeds(
    step: str,
    production_station: ProductionStation,
    releases: Releases,
    tmp_path: Any,
) -> None:
    station = production_station
    changes: dict[str, Any] = {}
    stall = threading.Event()
    with contextlib.ExitStack() as stack:
        if step == "download":  # a GitLab-like HTTPS source whose pack stalls mid-download
            served = str(tmp_path / "served")
            os.makedirs(os.path.join(served, "group"))
            subprocess.run(
                [
                    "git",
                    "clone",
                    "--quiet",
                    "--bare",
                    releases.repository,
                    f"{served}/group/ivy.git",
                ],
                check=True,
            )
            certificates = make_certificates(str(tmp_path / "certs"))
            state = GitServerState(served, token=TOKEN, stall=stall)
            port = stack.enter_context(
                git_https_server(state, certificates["cert"], certificates["key"])
            )
            source = [
                "--source",
                "gitlab",
                "--repository",
                "group/ivy",
                "--host",
                f"localhost:{port}",
            ]
            pinned = station.cli("trust", "set", *source)
            assert pinned.returncode == 0, pinned.stderr
            changes["updater"] = {
                "source": "gitlab",
                "repository": "group/ivy",
                "host": f"localhost:{port}",
                "access_token": TOKEN,
            }
            station.env["GIT_SSL_CAINFO"] = certificates["ca"]
        start(station)
        path = station.config_file("update.json", GOOD, 4, **changes)
        try:
            assert apply(station, path, wait=0).returncode == 0

            def in_step() -> bool:
                update = station.state().get("update_in_progress") or {}
                return update.get("step") == step

            assert wait_until(in_step, timeout=120, interval=0.02)
            mainloop = station.state()["mainloop"]["pid"]
            os.kill(mainloop, signal.SIGKILL)
            assert wait_until(lambda: station.processes() == [], timeout=30)
        finally:
            stall.set()

        start(station)  # as cron or systemd would
        assert station.pointed_version() == BASE
        assert station.running_versions() == {BASE}
        assert [n for n in os.listdir(station.root) if n.startswith(".staging")] == []
        assert station.state().get("update_in_progress") is None

        result = apply(station, path)  # the same config again
        assert result.returncode == 0 and "accepted" in result.stdout, result.stdout + result.stderr
        assert wait_until(lambda: station.running_versions() == {GOOD}, timeout=30)
        assert TOKEN not in _everything_logged(station.root)
        assert station.cli("stop").returncode == 0


def _everything_logged(root: str) -> str:
    text = []
    for pattern in ("data/logs/*", "data/messages/*"):
        for path in glob.glob(os.path.join(root, pattern)):
            with open(path, errors="replace") as f:
                text.append(f.read())
    return "\n".join(text)


def test_a_release_signed_by_an_unknown_key_is_refused_and_nothing_of_it_runs(
    production_station: ProductionStation, releases: Releases, tmp_path: Any
) -> None:
    station = production_station
    start(station)
    marker = str(tmp_path / "MARKER-unverified-release-ran")
    version = "9.8.7"
    clone = str(tmp_path / "evil-release")
    subprocess.run(["git", "clone", "--quiet", releases.repository, clone], check=True)
    git("checkout", "--quiet", f"v{BASE}", cwd=clone)
    set_version(clone, BASE, version)
    for name in ("cli.py", "conftest.py", "run.py"):
        with open(os.path.join(clone, name), "a") as f:
            f.write(f"\nopen({marker!r}, 'a').write(__file__)\n")
    git("add", "-A", cwd=clone)
    git("commit", "--quiet", "-m", version, cwd=clone)
    stranger = make_signer(str(tmp_path / "keys"), "stranger")
    sign_tag(clone, f"v{version}", stranger)
    git("push", "--quiet", releases.repository, f"v{version}", cwd=clone)
    path = station.config_file("evil.json", version, 2)
    result = apply(station, path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "does not verify against the release signers" in result.stderr
    assert not os.path.exists(marker)
    assert not os.path.exists(os.path.join(station.root, version))
    assert station.pointed_version() == BASE and station.running_versions() == {BASE}
    assert station.cli("stop").returncode == 0
