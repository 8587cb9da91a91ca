"""The station the chaos harness attacks: a copy of this checkout with two
chaos producers added, run through its own CLI (`cli.py start`, the way an
operator, cron or systemd starts it), with two destinations on real
Mosquittos: Tenta ("backend", every variant) on a primary broker with a
failover address, and ThingsBoard ("monitoring", data and logs, its own size
cap) on a broker of its own. Its data directory is on a small tmpfs when the
harness may mount one, and its wall clock is steppable (`wallclock.c`,
preloaded)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from typing import Any

import psutil

from benchmarks.signing import make_signer, trust_station
from src import constants

# the longest wait between the backend's reconnect attempts; outages outlast it
BACKEND_LONGEST_BACKOFF_S = 8
# while on its failover address, how often the Tenta backend tries the primary
FAILOVER_PROBE_S = 2
# the destinations: their names in the queue, as the config names them
TENTA_DESTINATION = "backend"
THINGSBOARD_DESTINATION = "monitoring"
DESTINATIONS = (TENTA_DESTINATION, THINGSBOARD_DESTINATION)

PRODUCERS = ("chaos_producer_a", "chaos_producer_b")
STATION_IDENTIFIER = "c4a05000-0000-4000-8000-000000000011"
HERE = os.path.dirname(os.path.abspath(__file__))


def build_clock_shim(directory: str) -> str:
    """Compile `wallclock.c` into `directory`; the path of the library, for
    `LD_PRELOAD` together with `IVY_CHAOS_CLOCK_FILE`. Called by the harness
    and by tests that step a station's clock."""
    library = os.path.join(directory, "libwallclock.so")
    source = os.path.join(HERE, "wallclock.c")
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", library, source, "-ldl", "-lm"],
        check=True,
        capture_output=True,
    )
    return library


def step_wall_clock(clock_file: str, seconds: float) -> None:
    """Set the wall clock of every process preloaded with the shim and reading
    `clock_file` to real time plus `seconds`. The file must exist (offset 0)
    before such a process starts: the shim maps it once."""
    mode = "r+b" if os.path.exists(clock_file) else "wb"
    with open(clock_file, mode) as f:
        f.write(struct.pack("d", seconds))
        f.flush()


def _mount_tmpfs(directory: str, size_mib: int) -> str | None:
    """Mount a tmpfs of `size_mib` on `directory`; None when mounted, else why
    not (not root, or no permission in this container)."""
    if os.geteuid() != 0:
        return "not root: a full disk needs a tmpfs the harness can mount"
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", directory],
        capture_output=True,
        text=True,
    )
    return None if result.returncode == 0 else f"mount refused: {result.stderr.strip()}"


class ChaosStation:
    """One station in `scratch`; see the module docstring."""

    def __init__(
        self,
        scratch: str,
        broker_ports: tuple[int, int, int],
        messages_per_second: float,
        max_queued_messages: int,
        data_tmpfs_mib: int,
    ) -> None:
        """Copy the checkout, write the config, mount the data directory and
        build the clock shim; nothing runs yet."""
        self.scratch = scratch
        self.project = os.path.join(scratch, "project")
        self.data_dir = os.path.join(scratch, "data")
        self.record_dir = os.path.join(scratch, "records")
        self.clock_file = os.path.join(scratch, "clock-offset")
        for directory in (self.data_dir, self.record_dir):
            os.makedirs(directory, exist_ok=True)
        self.full_disk_unavailable = _mount_tmpfs(self.data_dir, data_tmpfs_mib)
        self.mounted = self.full_disk_unavailable is None
        shutil.copytree(
            os.path.join(constants.PROJECT_DIR, "src"),
            os.path.join(self.project, "src"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for name in ("run.py", "cli.py", "pyproject.toml"):
            shutil.copy(os.path.join(constants.PROJECT_DIR, name), self.project)
        for producer in PRODUCERS:
            shutil.copy(
                os.path.join(HERE, "producer.py"),
                os.path.join(self.project, "src", "procedures", f"{producer}.py"),
            )
        os.makedirs(os.path.join(self.project, "config"))
        self.revision = 1
        self.config = self._config(broker_ports, messages_per_second, max_queued_messages)
        self.write_config(self.config)
        self.set_clock_offset(0.0)
        self.clock_library = build_clock_shim(scratch)
        # the operator's key: the station's trust policy takes configs it signs
        self.operator = make_signer(os.path.join(scratch, "keys"), "operator")
        trust_station(scratch, [self.operator], broker_hosts=["127.0.0.1"])

    def _config(self, ports: tuple[int, int, int], rate: float, max_queued: int) -> dict[str, Any]:
        """Tenta on `ports[0]` failing over to `ports[1]`; ThingsBoard on `ports[2]`."""
        primary, failover, monitoring = ports
        with open(constants.CONFIG_TEMPLATE_PATH) as f:
            config: dict[str, Any] = json.load(f)
        config["general"]["system_identifier"] = STATION_IDENTIFIER
        config["general"]["config_revision"] = self.revision
        config["logging_verbosity"] = {
            "console_prints": None,
            "file_archive": "INFO",
            "message_sending": "WARNING",
        }
        config["storage"]["max_queued_messages"] = max_queued
        config["backend"] = {
            "provider": "tenta",
            "mqtt_host": "127.0.0.1",
            "mqtt_port": primary,
            "failover": [{"mqtt_host": "127.0.0.1", "mqtt_port": failover}],
            "failover_probe_seconds": FAILOVER_PROBE_S,
            "mqtt_client_id": "ivy-chaos-station",
            "max_drain_time": 5,
            "reconnect_max_seconds": BACKEND_LONGEST_BACKOFF_S,
        }
        config["backends"] = {
            THINGSBOARD_DESTINATION: {
                "provider": "thingsboard",
                "mqtt_host": "127.0.0.1",
                "mqtt_port": monitoring,
                "mqtt_client_id": "ivy-chaos-monitoring",
                "mqtt_username": "chaos-device-token",
                "variants": ["data", "log"],
                "max_queued_messages": max_queued,
                "max_drain_time": 5,
                "reconnect_max_seconds": BACKEND_LONGEST_BACKOFF_S,
            }
        }
        config["trial"] = {"deadline_seconds": 120, "stable_seconds": 2, "max_starts": 3}
        # only the producers make data, so the size cap drops only their messages
        for section in ("dummy_procedure", "system_checks"):
            config[section] = None
        for producer in PRODUCERS:
            config[producer] = {
                "messages_per_second": rate / len(PRODUCERS),
                "record_dir": self.record_dir,
            }
        return config

    def write_config(self, config: dict[str, Any]) -> None:
        """Write `config/config.json` of the station."""
        with open(os.path.join(self.project, "config", "config.json"), "w") as f:
            json.dump(config, f, indent=4)

    def env(self) -> dict[str, str]:
        """The environment the station runs in."""
        return {
            **os.environ,
            "IVY_DATA_DIR": self.data_dir,
            "IVY_ROOT_DIR": self.scratch,
            "LD_PRELOAD": self.clock_library,
            "IVY_CHAOS_CLOCK_FILE": self.clock_file,
        }

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run the station's own `cli.py` with `args`."""
        return subprocess.run(
            [sys.executable, os.path.join(self.project, "cli.py"), *args],
            env=self.env(),
            cwd=self.project,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        """`ivy start`; raises with its output when it fails."""
        result = self.cli("start")
        if result.returncode != 0:
            raise RuntimeError(f"ivy start failed: {result.stdout}{result.stderr}")

    def stop(self) -> None:
        """`ivy stop`."""
        self.cli("stop", timeout=600)

    def set_clock_offset(self, seconds: float) -> None:
        """Step the station's wall clock to real time plus `seconds` (read by the
        preloaded shim on every call)."""
        step_wall_clock(self.clock_file, seconds)

    def main_process(self) -> psutil.Process | None:
        """The main loop (or a trial's guard), found by its command line."""
        script = os.path.join(self.project, "run.py")
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if script in (process.info["cmdline"] or []) and not _has_ancestor_with(
                    process, script
                ):
                    return process
        return None

    def processes(self) -> dict[str, psutil.Process]:
        """Every process of the station by role: `main`, and each child by the
        name the main loop gave it (its pid from the state, when readable)."""
        main = self.main_process()
        if main is None:
            return {}
        found = {"main": main}
        names = self._names_by_pid()
        with contextlib.suppress(psutil.Error):
            for child in main.children(recursive=True):
                found[names.get(child.pid, f"child-{child.pid}")] = child
        return found

    def _names_by_pid(self) -> dict[int, str]:
        try:
            with open(os.path.join(self.data_dir, "state.json")) as f:
                state = json.load(f)
            return {p["pid"]: name for name, p in state["processes"].items() if p.get("pid")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def queue_counts(self) -> tuple[int, dict[str, int]] | None:
        """(queued rows, per destination the data messages its size cap dropped
        so far: the producers' are the only data) read from the queue
        database; None when it cannot be read right now."""
        path = os.path.join(self.data_dir, "active-message-queue.sqlite3")
        if not os.path.exists(path):
            return None
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA busy_timeout=2000")
                queued = db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
                dropped = dict(
                    db.execute(
                        "SELECT name, value FROM counters WHERE name LIKE 'dropped_data@%'"
                    ).fetchall()
                )
                return int(queued), {
                    name: int(dropped.get(f"dropped_data@{name}", 0)) for name in DESTINATIONS
                }
        except sqlite3.Error:
            return None

    def address_in_use(self, destination: str) -> str | None:
        """host:port the destination's backend is connected to (state.json);
        None while it is not connected or the state cannot be read."""
        try:
            with open(os.path.join(self.data_dir, "state.json")) as f:
                connection = json.load(f)["destinations"][destination]
            return str(connection["broker"]) if connection["connected"] else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def archived_chaos_keys(self) -> tuple[set[tuple[int, int]], int]:
        """The producers' (incarnation, seq) in the station's archive, and the
        number of archive lines that are not JSON (a truncated line)."""
        keys: set[tuple[int, int]] = set()
        unreadable = 0
        for path in sorted(glob.glob(os.path.join(self.data_dir, "messages", "*.jsonl"))):
            with open(path, "rb") as f:
                for line in f:
                    try:
                        data = json.loads(line)["body"].get("data") or {}
                    except (ValueError, KeyError, AttributeError):
                        unreadable += 1
                        continue
                    if "chaos_seq" in data:
                        keys.add((int(data["chaos_incarnation"]), int(data["chaos_seq"])))
        return keys, unreadable

    def unmount(self) -> None:
        """Unmount the data directory's tmpfs (if the harness mounted one)."""
        if self.mounted:
            subprocess.run(["umount", "-l", self.data_dir], capture_output=True)
            self.mounted = False


def _has_ancestor_with(process: psutil.Process, script: str) -> bool:
    with contextlib.suppress(psutil.Error):
        for parent in process.parents():
            if script in parent.cmdline():
                return True
    return False
