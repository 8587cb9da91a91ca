"""Benchmark `footprint`: the proportional memory (PSS, shared pages divided
among the processes that share them) of a whole station: the main loop, the
dummy procedure, system checks and the Tenta backend against a real
Mosquitto, after it has run for a while. Side by side: a bare Python process
importing nothing (the floor, times four for four processes); the API
contract's floor: four processes forked as Ivy forks them that hold only
what every procedure must have (the interpreter, pydantic and Ivy's types,
a validated config and a message), nothing of the main loop, the queue,
MQTT or psutil; and the reference Ivy's 50.5 MiB for the same four
processes (the figure the issue tracker gives; that Ivy is not run here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import psutil

from src import constants

from .common import Figure
from .drain import tenta_config
from .mosquitto import Broker

_BENCHMARK = "footprint"
_REFERENCE_IVY_MIB = 50.5


def _pss_mib(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


def _bare_python_mib() -> float:
    bare = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(1.0)
        return _pss_mib([psutil.Process(bare.pid)])
    finally:
        bare.kill()
        bare.wait()


def _contract_floor_mib(processes: int) -> float:
    holder = subprocess.Popen(
        # run by path, not as a module of this package: it must not inherit
        # this benchmark's imports (paho, psutil)
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "api_contract.py"),
            str(processes - 1),
        ],
        cwd=constants.PROJECT_DIR,
        env={**os.environ, "PYTHONPATH": constants.PROJECT_DIR},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        holder.stdout.readline()
        time.sleep(2.0)  # the children have validated and collected
        main = psutil.Process(holder.pid)
        return _pss_mib([main, *main.children()])
    finally:
        for child in psutil.Process(holder.pid).children():
            child.kill()
        holder.kill()
        holder.wait()


def run(quick: bool) -> Iterator[Figure]:
    """PSS of a running station, vs. the floor and the reference figure."""
    settle = 10.0 if quick else 60.0
    with tempfile.TemporaryDirectory(prefix="ivy-bench-footprint-") as scratch:
        broker = Broker(os.path.join(scratch, "broker"))
        broker.start()
        data_dir = os.path.join(scratch, "data")
        config = tenta_config(broker.port)
        config["dummy_procedure"]["seconds_between_datapoints"] = 1
        config["system_checks"] = {"seconds_between_checks": 5}
        # a copy of this checkout, so that its own config/config.json stays untouched
        project = os.path.join(scratch, "project")
        shutil.copytree(
            os.path.join(constants.PROJECT_DIR, "src"),
            os.path.join(project, "src"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for name in ("run.py", "cli.py", "pyproject.toml"):
            shutil.copy(os.path.join(constants.PROJECT_DIR, name), project)
        os.makedirs(os.path.join(project, "config"))
        with open(os.path.join(project, "config", "config.json"), "w") as f:
            json.dump(config, f)
        station = subprocess.Popen(
            [sys.executable, os.path.join(project, "run.py")],
            env={**os.environ, "IVY_DATA_DIR": data_dir, "IVY_ROOT_DIR": scratch},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(settle)
            main = psutil.Process(station.pid)
            processes = [main, *main.children(recursive=True)]
            station_mib = _pss_mib(processes)
            floor = _bare_python_mib() * len(processes)
            contract_floor = _contract_floor_mib(len(processes))
            yield Figure(
                _BENCHMARK,
                f"station_pss_mib_{len(processes)}_processes",
                station_mib,
                "MiB",
                "reference Ivy, same four processes",
                _REFERENCE_IVY_MIB,
            )
            yield Figure(
                _BENCHMARK,
                "station_pss_vs_bare_python",
                station_mib,
                "MiB",
                f"{len(processes)} bare Python processes",
                floor,
            )
            yield Figure(
                _BENCHMARK,
                "station_pss_vs_api_contract",
                station_mib,
                "MiB",
                f"{len(processes)} forked processes holding only pydantic and Ivy's types",
                contract_floor,
            )
        finally:
            station.send_signal(signal.SIGTERM)
            station.wait(120)
            broker.stop()
