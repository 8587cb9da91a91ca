"""A procedure for the chaos harness, copied into the station it runs (as
`src/procedures/chaos_producer_<x>.py`): it queues `messages_per_second` data
messages `{"chaos_incarnation": i, "chaos_seq": n}` and keeps its own record
of every message that `add_message` accepted, outside the station's data
directory (which the harness fills up on purpose).

The record line `incarnation seq monotonic_seconds` is written after
`add_message` returned, so a message in the record was accepted; a kill
between the two leaves an accepted message out of the record (the harness
counts those as "delivered, not recorded", never as lost). A refused
`add_message` (a full disk) is counted in the record as `refused` and the
procedure carries on, as a real instrument's loop should.
"""

from __future__ import annotations

import os
import secrets
import time

import pydantic
from pydantic import Field

from src.types import Config, DataMessageBody
from src.types.procedure import ProcedureInfo
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent

# a producer that fell this far behind its schedule (a stopped disk, a
# paused process) starts a new schedule instead of bursting to catch up
_MAX_LAG_SECONDS = 1.0


class ChaosProducerConfig(pydantic.BaseModel):
    """This producer's config section."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    messages_per_second: float = Field(50.0, gt=0, le=10_000)
    record_dir: str = Field(..., min_length=1)


def run(config: Config, name: str) -> None:
    """Produce until stopped. Runs in its own process, started by the main loop."""
    section = config.procedure_section(name, ChaosProducerConfig)
    assert section is not None
    logger = Logger(config, name)
    agent = MessagingAgent(config)
    incarnation = secrets.randbits(31)
    os.makedirs(section.record_dir, exist_ok=True)
    record = os.open(
        os.path.join(section.record_dir, f"{name}.record"),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT,
        0o644,
    )
    interval = 1.0 / section.messages_per_second
    logger.info(f"incarnation {incarnation}: {section.messages_per_second} messages per second")
    sequence = 0
    due = time.monotonic()
    while True:
        due += interval
        lag = time.monotonic() - due
        if lag > _MAX_LAG_SECONDS:
            due = time.monotonic()
        elif lag < 0:
            time.sleep(-lag)
        body = DataMessageBody(
            data={"chaos_incarnation": float(incarnation), "chaos_seq": float(sequence)}
        )
        try:
            agent.add_message(body)
        except Exception as e:  # a full disk: loud to this procedure, which goes on
            os.write(record, f"refused {type(e).__name__}: {e}\n".encode())
            continue
        os.write(record, f"{incarnation} {sequence} {time.monotonic():.3f}\n".encode())
        sequence += 1


info = ProcedureInfo(run=run, config_model=ChaosProducerConfig)
