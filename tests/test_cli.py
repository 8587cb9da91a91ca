"""The operator's commands through the real entry point (`ivy ...` in a
subprocess): status exit codes for each unhealthy condition, logs filters and
follow, the message history across a day boundary and across the
archive/queue boundary, the queue, and broken data directories."""

from __future__ import annotations

import csv
import io
import json
import os
import select
import signal
import subprocess
import sys
from typing import Any

import pytest

from benchmarks.mosquitto import free_port
from src.types import Config, DataMessageBody, LogMessageBody
from src.utils.messaging_agent import MessagingAgent
from tests.conftest import Station, template_config_dict, wait_until
from tests.test_station import fast_config

pytestmark = pytest.mark.integration

CRASHING = """
import pydantic
from src.types import Config
from src.types.procedure import ProcedureInfo


class CrashConfig(pydantic.BaseModel):
    pass


def run(config: Config, name: str) -> None:
    raise RuntimeError("the instrument is unplugged")


info = ProcedureInfo(run=run, config_model=CrashConfig)
"""


def exit_code(station: Station, *args: str) -> int:
    return station.cli("status", *args).returncode


def test_status_exit_codes_for_each_condition(station: Station) -> None:
    station.write_config(fast_config())
    assert exit_code(station) == 1  # not running
    assert station.cli("start").returncode == 0
    assert wait_until(lambda: exit_code(station) == 0, timeout=30)  # healthy
    assert station.cli("stop").returncode == 0

    with open(os.path.join(station.project_dir, "src", "procedures", "crasher.py"), "w") as f:
        f.write(CRASHING)
    config = fast_config()
    config["crasher"] = {}
    station.write_config(config)
    assert station.cli("start").returncode == 0
    assert wait_until(lambda: exit_code(station) == 3, timeout=30)  # a crash loop
    text = station.cli("status").stdout
    assert "crasher is crash-looping (RuntimeError: the instrument is unplugged)" in text
    assert "\x1b[" not in text  # plain when piped
    assert station.cli("stop").returncode == 0

    config = fast_config()
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": free_port(),  # nothing listens: disconnected, messages wait
        "mqtt_client_id": "c",
        "max_drain_time": 0,
    }
    station.write_config(config)
    assert station.cli("start").returncode == 0
    assert wait_until(lambda: station.status()["backend_connection"] is not None, timeout=30)
    assert exit_code(station) == 0  # within the default thresholds
    assert exit_code(station, "--max-disconnected", "0") == 3
    assert exit_code(station, "--max-queue-age", "0") == 3
    problems = station.status()["problems"]  # the default thresholds: none yet
    assert problems == []
    result = station.cli("status", "--json", "--max-disconnected", "0", "--max-queue-age", "0")
    reasons = json.loads(result.stdout)["problems"]
    assert any("disconnected for" in r for r in reasons)
    assert any("oldest unsent message" in r for r in reasons)
    assert station.cli("stop").returncode == 0


def test_logs_filters_and_follow(station: Station) -> None:
    station.write_config(fast_config())
    env = station.env
    script = (
        "from src.types import Config\n"
        "from src.utils.logger import Logger\n"
        "config = Config.load()\n"
        "Logger(config, 'alpha').info('alpha info')\n"
        "Logger(config, 'alpha').error('alpha error', details='first\\nsecond')\n"
        "Logger(config, 'beta-1').warning('beta warning')\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, cwd=station.project_dir, check=True)

    def logs(*args: str) -> subprocess.CompletedProcess[str]:
        return station.cli("logs", *args)

    everything = logs().stdout
    assert "alpha info" in everything and "beta warning" in everything
    errors = logs("--level", "error").stdout
    assert "alpha error" in errors and "first" in errors and "second" in errors
    assert "alpha info" not in errors and "beta warning" not in errors
    assert logs("--origin", "beta*").stdout.strip().endswith("beta warning")
    assert "alpha" not in logs("--origin", "beta-1").stdout
    assert logs("-n", "1").stdout.strip().endswith("beta warning")
    assert logs("--since", "10min").returncode == 0
    assert logs("--until", "2020-01-01").returncode == 1  # nothing that old
    bad = logs("--since", "last tuesday")
    assert bad.returncode == 2 and "is not a time" in bad.stderr

    follower = subprocess.Popen(
        [
            sys.executable,
            os.path.join(station.project_dir, "cli.py"),
            "logs",
            "-f",
            "-n",
            "0",
            "--origin",
            "gamma",
        ],
        env=env,
        cwd=station.project_dir,
        stdout=subprocess.PIPE,
        text=True,
        # Ctrl-C in a terminal is what is tested; a suite started as a background job
        # (`pytest &` without job control) hands its children SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    late = (
        "from src.types import Config\n"
        "from src.utils.logger import Logger\n"
        "Logger(Config.load(), 'delta').info('delta is filtered out')\n"
        "Logger(Config.load(), 'gamma').info('gamma arrives later')\n"
    )
    try:
        assert follower.stdout is not None
        # The follower starts at the end of the file whenever it is ready; under load that
        # can be after a first write, so write again until it shows one (bounded).
        line = ""
        for _ in range(10):
            run = [sys.executable, "-c", late]
            subprocess.run(run, env=env, cwd=station.project_dir, check=True)
            if select.select([follower.stdout], [], [], 2.0)[0]:
                line = follower.stdout.readline()
                break
        assert "gamma - INFO - gamma arrives later" in line
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(timeout=10)
        finally:
            follower.kill()
    assert follower.returncode == 0


def agent_of(station: Station) -> MessagingAgent:
    return MessagingAgent(
        Config.model_validate(template_config_dict()),
        station.path("active-message-queue.sqlite3"),
        station.path("messages"),
    )


def test_messages_cover_days_and_the_archive_queue_boundary(station: Station) -> None:
    station.write_config(template_config_dict())
    agent = agent_of(station)
    day_one = 1_763_855_000.0  # 2025-11-22 23:43 UTC
    day_two = day_one + 3_600  # past midnight
    archived = agent.add_messages(
        [DataMessageBody(data={"co2": 400.0 + i, "t": 20}) for i in range(3)], day_one
    )
    agent.add_message(LogMessageBody(level="WARNING", subject="fan", body="slow"), day_one + 1)
    agent.flush_archive()  # these are in the archive files now
    queued = agent.add_messages(
        [DataMessageBody(data={"co2": 500.0 + i}) for i in range(2)], day_two
    )
    agent.close()  # these only in the queue

    jsonl = station.cli("messages", "--format", "jsonl")
    assert jsonl.returncode == 0, jsonl.stderr
    lines = [json.loads(line) for line in jsonl.stdout.splitlines()]
    data = [m["identifier"] for m in lines if m["body"]["variant"] == "data"]
    assert data == [*archived, *queued]  # each once, in order
    assert sorted(os.listdir(station.path("messages"))) == ["2025-11-22.jsonl"]

    rows = list(
        csv.reader(io.StringIO(station.cli("messages", "--format", "csv", "--key", "co2").stdout))
    )
    assert rows[0] == ["time", "identifier", "variant", "key", "value"]
    assert [r[4] for r in rows[1:]] == ["400.0", "401.0", "402.0", "500.0", "501.0"]
    assert rows[-1][0].startswith("2025-11-23T")  # the second day

    second_day = station.cli("messages", "--since", "2025-11-23", "--format", "jsonl").stdout
    assert [json.loads(x)["identifier"] for x in second_day.splitlines()] == queued
    logs_only = station.cli("messages", "--variant", "log").stdout
    assert "WARNING" in logs_only and "fan: slow" in logs_only and "co2" not in logs_only

    queue = station.cli("queue")
    assert queue.returncode == 0 and "6 message(s) unsent" in queue.stdout
    assert archived[0] in queue.stdout and "d old" in queue.stdout  # the oldest first, with its age


def test_broken_data_directories_get_a_clear_message(station: Station) -> None:
    station.write_config(template_config_dict())
    os.makedirs(station.data_dir, exist_ok=True)
    with open(station.path("active-message-queue.sqlite3"), "wb") as f:
        f.write(b"this is not a database" * 100)
    for args in (("status",), ("queue",), ("messages",)):
        result = station.cli(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "active-message-queue.sqlite3 cannot be opened" in result.stderr
        assert "Traceback" not in result.stderr

    a_file = os.path.join(station.project_dir, "not-a-directory")
    open(a_file, "w").close()
    for command in ("status", "queue", "messages", "logs"):
        result = subprocess.run(
            [sys.executable, os.path.join(station.project_dir, "cli.py"), command],
            env={**station.env, "IVY_DATA_DIR": a_file},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 1 and "is not a directory" in result.stderr, command
        assert "Traceback" not in result.stderr

    missing: dict[str, Any] = {**station.env, "IVY_DATA_DIR": station.path("nowhere", "deeper")}
    result = subprocess.run(
        [sys.executable, os.path.join(station.project_dir, "cli.py"), "logs"],
        env=missing,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and "no log entries match" in result.stderr
    assert "Traceback" not in result.stderr
