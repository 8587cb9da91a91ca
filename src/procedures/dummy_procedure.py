"""A random walk, one data point per `seconds_between_datapoints`, aligned to
multiples of the interval. It stands in for a real instrument and shows the
shape every procedure has: its config section and state as models, a `run`
that waits, measures, queues and updates its state, and one `info` record."""

import random
import time

import pydantic
from pydantic import Field

from src.types import Config, DataMessageBody
from src.types.procedure import ProcedureInfo
from src.utils.functions import get_time_to_next_datapoint
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface


class DummyProcedureConfig(pydantic.BaseModel):
    """Section `dummy_procedure`."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    seconds_between_datapoints: int = Field(
        10, ge=1, le=86_400, description="One random-walk data point per interval."
    )


class DummyProcedureState(pydantic.BaseModel):
    """The latest value of the random walk."""

    model_config = pydantic.ConfigDict(validate_assignment=True)
    last_value: float | None = None
    last_measurement_time: float | None = None


def run(config: Config, name: str) -> None:
    """Measure forever. Runs in its own process, started by the main loop."""
    section = config.procedure_section(name, DummyProcedureConfig)
    assert section is not None
    interval = section.seconds_between_datapoints
    logger = Logger(config, name)
    messaging_agent = MessagingAgent(config)
    value = StateInterface.load().procedure_state(name, DummyProcedureState).last_value or 0.0
    logger.info(f"starting at {value:.3f}, one data point every {interval} s")
    while True:
        time.sleep(get_time_to_next_datapoint(interval))
        value += random.gauss(0.0, 1.0)
        now = time.time()
        messaging_agent.add_message(DataMessageBody(data={"random_walk": value}), timestamp=now)
        with StateInterface.update() as state:
            own = state.procedure_state(name, DummyProcedureState)
            own.last_value = value
            own.last_measurement_time = now
        logger.debug(f"new data point {value:.3f}")


info = ProcedureInfo(run=run, config_model=DummyProcedureConfig, state_model=DummyProcedureState)
