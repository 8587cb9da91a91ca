"""An example procedure written only against Ivy's reference API. Copy it to
`src/procedures/thermometer.py`, add a `"thermometer": {...}` section to
`config/config.json`, and the station runs it: nothing else changes.
(The test suite does exactly that, in tests/test_procedures.py.)"""

import datetime
import random
import time

import pydantic

from src.types import Config, DataMessageBody
from src.types.procedure import ProcedureInfo
from src.utils.functions import get_time_to_next_datapoint
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface


class ThermometerConfig(pydantic.BaseModel):
    """Section `thermometer`: its settings, validated when the config loads."""

    model_config = pydantic.ConfigDict(extra="forbid")
    seconds_between_datapoints: int = pydantic.Field(
        10, ge=1, le=3_600, description="One temperature reading per interval."
    )


def run(config: Config, name: str) -> None:
    """Measure forever; the main loop runs this in its own process."""
    logger = Logger(config, name)
    section = config.procedure_section(name, ThermometerConfig)
    assert section is not None  # the main loop runs only procedures with a section
    messaging_agent = MessagingAgent()
    logger.info("thermometer started")
    while True:
        time.sleep(get_time_to_next_datapoint(section.seconds_between_datapoints))
        temperature = 20 + random.random()
        messaging_agent.add_message(DataMessageBody(data={"temperature_c": temperature}))
        with StateInterface.update() as state:
            state.system.last_boot_time = datetime.datetime.now()
        logger.debug("measured", details=f"{temperature:.2f} °C")


info = ProcedureInfo(run=run, config_model=ThermometerConfig)
