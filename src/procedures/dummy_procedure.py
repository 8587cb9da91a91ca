"""A random walk, one data point per `seconds_between_datapoints`, aligned to
multiples of the interval. It stands in for a real instrument and shows the
shape every procedure has: wait, measure, queue, update the state."""

import random
import time

from src.types import Config, DataMessageBody
from src.utils.functions import get_time_to_next_datapoint
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface


def run(config: Config, name: str) -> None:
    """Measure forever. Runs in its own process, started by the main loop."""
    assert config.dummy_procedure is not None
    interval = config.dummy_procedure.seconds_between_datapoints
    logger = Logger(config, name)
    messaging_agent = MessagingAgent(config)
    value = StateInterface.load().dummy_procedure.last_value or 0.0
    logger.info(f"starting at {value:.3f}, one data point every {interval} s")
    while True:
        time.sleep(get_time_to_next_datapoint(interval))
        value += random.gauss(0.0, 1.0)
        now = time.time()
        messaging_agent.add_message(DataMessageBody(data={"random_walk": value}), timestamp=now)
        with StateInterface.update() as state:
            state.dummy_procedure.last_value = value
            state.dummy_procedure.last_measurement_time = now
        logger.debug(f"new data point {value:.3f}")
