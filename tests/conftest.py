"""Shared fixtures. Every test gets its own data directory; integration tests get
a whole station (a copy of the project) in a temporary directory, driven through
the real CLI in real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

# before src is imported: no test may touch the developer's own data directory
# (removed again when the session ends)
_SESSION_DIRECTORIES = [
    tempfile.mkdtemp(prefix="ivy-test-data-"),
    tempfile.mkdtemp(prefix="ivy-test-root-"),
]
os.environ["IVY_DATA_DIR"], os.environ["IVY_ROOT_DIR"] = _SESSION_DIRECTORIES

from benchmarks.signing import Signer, make_signer, trust_station  # noqa: E402
from src import constants, procedures  # noqa: E402, F401 - registers the procedure sections

# fixtures of the tests on a production root (releases, stations, a broker)
pytest_plugins = ["tests.production_fixtures"]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's own temporary directories."""
    for directory in _SESSION_DIRECTORIES:
        shutil.rmtree(directory, ignore_errors=True)


PROJECT_DIR = constants.PROJECT_DIR
_SIGNERS: list[Signer] = []


def operator_key() -> Signer:
    """The session's operator key: every station the tests make (and the
    session's own root) trusts it for configs."""
    if not _SIGNERS:
        _SIGNERS.append(make_signer(os.path.join(_SESSION_DIRECTORIES[0], "keys"), "operator"))
    return _SIGNERS[0]


@pytest.fixture(scope="session", autouse=True)
def session_trust_policy() -> None:
    """The session root trusts the operator key for configs on any broker
    host (what `python -m src.backend` processes of the tests read)."""
    trust_station(_SESSION_DIRECTORIES[1], [operator_key()])


def signed(config: dict[str, Any], **options: Any) -> str:
    """`config` signed with the session's operator key, as JSON text."""
    return operator_key().sign_text(config, **options)


_DATA_PATH_CONSTANTS = {
    "DATA_DIR": "",
    "STATE_PATH": "state.json",
    "STATE_LOCK_PATH": "state.lock",
    "MESSAGE_QUEUE_PATH": "active-message-queue.sqlite3",
    "MESSAGE_ARCHIVE_DIR": "messages",
    "LOGS_DIR": "logs",
    "MAINLOOP_LOCK_PATH": "ivy.lock",
    "MAINLOOP_OUTPUT_PATH": "logs/mainloop-output.txt",
}


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point every data path of `src.constants` into this test's temporary dir."""
    directory = str(tmp_path / "data")
    os.makedirs(directory)
    point_data_paths_at(monkeypatch, directory)
    monkeypatch.setattr(constants, "CONFIG_PATH", str(tmp_path / "config.json"))
    return directory


def point_data_paths_at(monkeypatch: pytest.MonkeyPatch, directory: str) -> None:
    """Make this test process use `directory` as its data directory (a
    station's, to queue messages into it as its procedures do)."""
    for name, relative in _DATA_PATH_CONSTANTS.items():
        monkeypatch.setattr(constants, name, os.path.join(directory, relative).rstrip("/"))


def template_config_dict() -> dict[str, Any]:
    """The tracked template as a dict, to modify in tests; its trial asks for
    one second without a restart (not 30), so that tests wait little for a
    config to be accepted."""
    with open(os.path.join(PROJECT_DIR, "config", "config.template.json")) as f:
        result: dict[str, Any] = json.load(f)
    result["trial"] = {"deadline_seconds": 60, "stable_seconds": 1, "max_starts": 3}
    return result


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@dataclass
class Station:
    """A copy of the project in a temporary directory with its own data dir,
    and a root whose trust policy takes configs signed by the session's
    operator key (`signed`)."""

    project_dir: str
    data_dir: str
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `ivy ARGS` of this station and capture its output."""
        return subprocess.run(
            [sys.executable, os.path.join(self.project_dir, "cli.py"), *args],
            env=self.env,
            cwd=self.project_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_py(self) -> subprocess.CompletedProcess[str]:
        """Run this station's run.py in the foreground and capture its output."""
        return subprocess.run(
            [sys.executable, os.path.join(self.project_dir, "run.py")],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def write_config(self, config: dict[str, Any]) -> None:
        """Write config/config.json of this station."""
        with open(os.path.join(self.project_dir, "config", "config.json"), "w") as f:
            json.dump(config, f, indent=4)

    def status(self) -> dict[str, Any]:
        """`ivy status --json`, parsed."""
        result = self.cli("status", "--json")
        assert result.returncode in (0, 1, 3), result.stderr  # healthy, stopped, unhealthy
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed

    def processes(self) -> list[psutil.Process]:
        """Every live process running this station's run.py."""
        run_py = os.path.join(self.project_dir, "run.py")
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            try:
                if run_py in (p.info["cmdline"] or []) and p.info["status"] != "zombie":
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def path(self, *parts: str) -> str:
        """A path inside this station's data directory."""
        return os.path.join(self.data_dir, *parts)


def make_station(directory: str) -> Station:
    """A station copy under `directory` (project, data dir, root), trusting
    the session's operator key for configs."""
    project_dir = os.path.join(directory, "project")
    os.makedirs(os.path.join(project_dir, "config"))
    for name in ("run.py", "cli.py", "pyproject.toml"):
        shutil.copy(os.path.join(PROJECT_DIR, name), project_dir)
    shutil.copy(
        os.path.join(PROJECT_DIR, "config", "config.template.json"),
        os.path.join(project_dir, "config"),
    )
    shutil.copytree(
        os.path.join(PROJECT_DIR, "src"),
        os.path.join(project_dir, "src"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {
        **os.environ,
        "IVY_ROOT_DIR": os.path.join(directory, "root"),
        "IVY_DATA_DIR": os.path.join(directory, "station-data"),
        "PYTHONUNBUFFERED": "1",
    }
    trust_station(env["IVY_ROOT_DIR"], [operator_key()])
    return Station(project_dir=project_dir, data_dir=env["IVY_DATA_DIR"], env=env)


def kill_station(station: Station) -> None:
    """SIGKILL every process of the station, whatever state it is in."""
    for p in station.processes():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


@pytest.fixture
def station(tmp_path: Any) -> Iterator[Station]:
    """A station copy whose processes are killed at the end, whatever happened."""
    s = make_station(str(tmp_path))
    try:
        yield s
    finally:
        kill_station(s)


class BackendProcess:
    """`python -m src.backend` in its own process, on this test's data dir
    (the config's first destination, or `destination`)."""

    def __init__(
        self, data_dir: str, config: dict[str, Any], destination: str | None = None
    ) -> None:
        self.config_path = os.path.join(data_dir, f"backend-config-{destination}.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        self.destination = destination
        self.env = {**os.environ, "IVY_DATA_DIR": data_dir}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "src.backend",
                self.config_path,
                *([self.destination] if self.destination else []),
            ],
            env=self.env,
            cwd=PROJECT_DIR,
            stdout=subprocess.DEVNULL,
        )

    def stop(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=20)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture
def processes() -> Iterator[list[BackendProcess]]:
    started: list[BackendProcess] = []
    yield started
    for p in started:
        if p.alive():
            p.kill()
