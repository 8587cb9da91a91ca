"""A whole station driven through the real CLI: real main loop, real children,
real signals, real files, in a temporary project copy and data directory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from src.utils.messaging_agent import MessagingAgent
from tests.conftest import Station, template_config_dict, wait_until

pytestmark = pytest.mark.integration


def fast_config(**changes: Any) -> dict[str, Any]:
    config = template_config_dict()
    config["dummy_procedure"]["seconds_between_datapoints"] = 1
    config["system_checks"]["seconds_between_checks"] = 5
    config.update(changes)
    return config


def agent_of(station: Station) -> MessagingAgent:
    return MessagingAgent(
        None, station.path("active-message-queue.sqlite3"), station.path("messages")
    )


def data_messages(station: Station) -> list[dict[str, Any]]:
    agent = agent_of(station)
    try:
        return [
            m.body.model_dump()
            for m in agent.get_n_latest_messages(100_000)
            if m.body.variant == "data"
        ]
    finally:
        agent.close()


def archived_data_keys(station: Station) -> set[str]:
    keys: set[str] = set()
    if not os.path.isdir(station.path("messages")):
        return keys
    for name in os.listdir(station.path("messages")):
        with open(station.path("messages", name)) as f:
            for line in f:
                body = json.loads(line)["body"]
                if body["variant"] == "data":
                    keys |= set(body["data"])
    return keys


def start(station: Station) -> None:
    result = station.cli("start")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ivy started" in result.stdout


def test_station_measures_queues_archives_restarts_and_stops(station: Station) -> None:
    station.write_config(fast_config())
    start(station)

    # both procedures produce data, in the queue and in the archive file
    assert wait_until(
        lambda: (
            {"random_walk", "cpu_usage_percent"}
            <= {k for m in data_messages(station) for k in m["data"]}
        ),
        timeout=30,
    )
    assert wait_until(
        lambda: {"random_walk", "disk_free_gb"} <= archived_data_keys(station), timeout=30
    )

    # a second instance is refused, through the CLI and through run.py itself
    again = station.cli("start")
    assert again.returncode == 1 and "already running" in again.stderr
    direct = station.run_py()
    assert direct.returncode == 1 and "already running" in direct.stderr

    status = station.status()
    assert status["running"] and status["queue"]["depth"] > 0
    assert status["queue"]["oldest_age_seconds"] is not None
    old_pid = status["processes"]["dummy_procedure"]["pid"]
    assert status["processes"]["system_checks"]["alive"]

    # kill -9 of a procedure: a new one follows
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.time()

    def replaced() -> bool:
        p = station.status()["processes"]["dummy_procedure"]
        return bool(p["alive"]) and p["pid"] not in (None, old_pid)

    assert wait_until(replaced, timeout=15, interval=0.1)
    print(f"dummy_procedure replaced {time.time() - killed_at:.2f} s after kill -9")
    after = station.status()["processes"]["dummy_procedure"]
    assert after["restarts"] == 1 and after["last_error"] == "killed by signal SIGKILL"

    text_status = station.cli("status")
    assert ": running (pid" in text_status.stdout
    assert re.search(
        r"dummy_procedure\s+alive\s+\d+\s+1\s+killed by signal SIGKILL \(\d+ s ago\)",
        text_status.stdout,
    )
    logs = station.cli("logs", "-n", "200")
    assert logs.returncode == 0 and "stopped unexpectedly (killed by signal SIGKILL)" in logs.stdout

    stopped = station.cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert station.processes() == []
    assert station.cli("is-running").returncode == 1
    assert station.cli("stop").returncode == 1
    assert station.status()["running"] is False


def test_killing_the_main_loop_leaves_no_orphans(station: Station) -> None:
    station.write_config(fast_config())
    start(station)
    assert wait_until(lambda: len(station.processes()) == 3, timeout=15)
    main_pid = station.status()["mainloop"]["pid"]
    os.kill(main_pid, signal.SIGKILL)
    assert wait_until(lambda: station.processes() == [], timeout=15)
    assert station.cli("is-running").returncode == 1
    start(station)  # the lock went with the processes
    first_pid = station.status()["mainloop"]["pid"]
    restarted = station.cli("restart")
    assert restarted.returncode == 0 and "Ivy stopped" in restarted.stdout, restarted.stderr
    assert station.status()["mainloop"]["pid"] not in (None, first_pid)
    assert station.cli("stop").returncode == 0


def test_malformed_config_is_refused_with_a_clear_message(station: Station) -> None:
    config = fast_config()
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "x",
        "mqtt_client_id": "c",
        "mqtt_port": 0,
    }
    station.write_config(config)
    for result in (
        station.cli("start"),
        station.cli("config", "check"),
        station.run_py(),
    ):
        assert result.returncode == 1
        assert (
            "backend.mqtt_port: Input should be greater than or equal to 1 (got 0)" in result.stderr
        )
        assert "Traceback" not in result.stdout + result.stderr
    with open(os.path.join(station.project_dir, "config", "config.json"), "w") as f:
        f.write('{"general": {')
    result = station.cli("start")
    assert result.returncode == 1 and "Invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert station.processes() == []


def test_corrupt_state_file_is_set_aside_and_the_station_runs(station: Station) -> None:
    station.write_config(fast_config())
    os.makedirs(station.data_dir)
    with open(station.path("state.json"), "w") as f:
        f.write("{ this is not json")
    start(station)
    aside = [n for n in os.listdir(station.data_dir) if n.startswith("state.json.corrupt-")]
    assert len(aside) == 1
    assert "state file could not be read" in station.cli("logs", "-n", "500").stdout
    assert station.status()["running"]
    assert station.cli("stop").returncode == 0


def test_pending_config_is_applied_by_the_running_station(station: Station) -> None:
    station.write_config(fast_config())
    start(station)
    new_config = fast_config(system_checks=None)
    new_config["general"]["config_revision"] = 7
    queue_pending = (
        "import json, sys\n"
        "from src.types import ForeignConfig\n"
        "from src.utils.state_interface import StateInterface\n"
        "with StateInterface.update() as state:\n"
        "    state.pending_configs.append(ForeignConfig.model_validate(json.loads(sys.argv[1])))\n"
    )
    subprocess.run(
        [sys.executable, "-c", queue_pending, json.dumps(new_config)],
        env=station.env,
        cwd=station.project_dir,
        check=True,
        timeout=60,
    )

    def applied() -> bool:
        status = station.status()
        return status["config"].get("revision") == 7 and set(status["processes"]) == {
            "dummy_procedure"
        }

    assert wait_until(applied, timeout=30, interval=0.2)

    def acks() -> list[tuple[str, int]]:
        return [
            (m.body.status, m.body.config_revision)
            for m in agent_of(station).get_n_latest_messages(100_000)
            if m.body.variant == "config" and m.body.config_revision is not None
        ]

    # accepted once it has run healthy for the trial's stable_seconds
    assert wait_until(lambda: len(acks()) == 3, timeout=30, interval=0.2)
    assert acks() == [
        ("startup", 0),
        ("received", 7),
        ("accepted", 7),
    ]
    assert len(station.processes()) == 2
    assert station.cli("stop").returncode == 0


def test_operator_commands_and_exit_codes(station: Station) -> None:
    config = fast_config()
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "localhost",
        "mqtt_client_id": "c",
        "mqtt_password": "top-secret-pw",
    }
    station.write_config(config)
    assert station.cli("no-such-command").returncode == 2
    assert station.cli("logs", "--lines", "many").returncode == 2
    info = station.cli("info")
    assert info.returncode == 0 and station.data_dir in info.stdout
    shown = station.cli("config", "show")
    assert shown.returncode == 0 and "top-secret-pw" not in shown.stdout and "*****" in shown.stdout
    cron = station.cli("boot", "cron")
    assert cron.stdout.startswith("* * * * * ") and "cli.py start" in cron.stdout
    unit = station.cli("boot", "systemd").stdout
    assert "KillMode=mixed" in unit and f"IVY_DATA_DIR={station.data_dir}" in unit
    assert f"ExecStart={sys.executable} {station.project_dir}/cli.py run" in unit
    assert station.cli("is-running").returncode == 1
    status = station.cli("status")
    assert status.returncode == 1 and ": not running" in status.stdout


def test_config_init_writes_the_template_once(station: Station) -> None:
    first = station.cli("config", "init")
    assert first.returncode == 0 and "wrote" in first.stdout
    second = station.cli("config", "init")
    assert second.returncode == 0 and "left unchanged" in second.stdout
    assert station.cli("config", "check").returncode == 0
