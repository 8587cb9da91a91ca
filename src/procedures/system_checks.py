"""System health: load, CPU and memory use, free disk of the data partition,
last boot time and CPU temperature (where the machine has a sensor)."""

import os
import time

import psutil
import pydantic
from pydantic import Field

from src import constants
from src.types import Config, DataMessageBody, SystemState
from src.types.procedure import ProcedureInfo
from src.utils.functions import get_time_to_next_datapoint
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface


class SystemChecksConfig(pydantic.BaseModel):
    """Section `system_checks`."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    seconds_between_checks: int = Field(
        60, ge=5, le=86_400, description="Interval of the system health data points."
    )


# names under which Linux drivers report the CPU package temperature
_CPU_SENSOR_NAMES = ("cpu_thermal", "coretemp", "k10temp", "cpu-thermal", "soc_thermal", "acpitz")


def read_cpu_temperature() -> float | None:
    """The hottest CPU sensor in °C, or None when the machine has none."""
    read_sensors = getattr(psutil, "sensors_temperatures", None)
    if read_sensors is None:
        return None
    try:
        sensors = read_sensors()
    except (OSError, RuntimeError):
        return None
    for sensor_name in _CPU_SENSOR_NAMES:
        readings = [r.current for r in sensors.get(sensor_name, []) if r.current is not None]
        if readings:
            return float(max(readings))
    return None


def read_system_state() -> SystemState:
    """One reading of every quantity. Blocks for one second to measure CPU use."""
    os.makedirs(constants.DATA_DIR, exist_ok=True)
    disk = psutil.disk_usage(constants.DATA_DIR)
    load_1, load_5, load_15 = os.getloadavg()
    return SystemState(
        last_updated=time.time(),
        last_boot_time=psutil.boot_time(),
        load_averages=(load_1, load_5, load_15),
        last_5_min_load=round(100 * load_5 / (psutil.cpu_count() or 1), 1),
        cpu_usage_percent=psutil.cpu_percent(interval=1.0),
        memory_usage_percent=psutil.virtual_memory().percent,
        disk_free_gb=round(disk.free / 1e9, 3),
        disk_usage_percent=disk.percent,
        cpu_temperature_c=read_cpu_temperature(),
    )


def run(config: Config, name: str) -> None:
    """Check forever. Runs in its own process, started by the main loop."""
    section = config.procedure_section(name, SystemChecksConfig)
    assert section is not None
    interval = section.seconds_between_checks
    logger = Logger(config, name)
    messaging_agent = MessagingAgent(config)
    logger.info(f"checking the system every {interval} s")
    while True:
        reading = read_system_state()
        data: dict[str, float | int | str] = {
            key: value
            for key, value in reading.model_dump(exclude={"load_averages", "last_updated"}).items()
            if value is not None
        }
        assert reading.load_averages is not None
        data.update(
            zip(
                ("load_average_1m", "load_average_5m", "load_average_15m"),
                reading.load_averages,
                strict=True,
            )
        )
        messaging_agent.add_message(DataMessageBody(data=data))
        with StateInterface.update() as state:
            state.system = reading
        if reading.disk_usage_percent is not None and reading.disk_usage_percent > 90:
            logger.warning(f"the data partition is {reading.disk_usage_percent:.1f} % full")
        time.sleep(get_time_to_next_datapoint(interval))


info = ProcedureInfo(run=run, config_model=SystemChecksConfig)
