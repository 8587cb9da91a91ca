"""The main loop's own objects after a reconfiguration: fresh ones with the new
config, the old ones closed, no leaked connections."""

from __future__ import annotations

import os
from typing import Any

import psutil
import pytest

from src.main import Mainloop
from src.types import Config, DataMessageBody, LogMessageBody
from src.utils.update.version_trial import GUARD_ENVIRONMENT_VARIABLE
from tests.conftest import template_config_dict

pytestmark = pytest.mark.quick


def config_with(revision: int, cap: int) -> Config:
    config = template_config_dict()
    config["general"]["config_revision"] = revision
    config["storage"]["max_queued_messages"] = cap
    config["logging_verbosity"]["message_sending"] = "WARNING"
    config["logging_verbosity"]["console_prints"] = None
    return Config.model_validate(config)


def use(mainloop: Mainloop) -> None:
    mainloop.logger.warning("a line that goes to the queue too")  # opens the logger's agent
    mainloop.messaging_agent.add_message(DataMessageBody(data={"x": 1}))


def test_a_hundred_reconfigurations_leak_nothing_and_use_the_new_config() -> None:
    mainloop = Mainloop(config_with(0, 1_000))
    use(mainloop)
    open_files = psutil.Process().num_fds()
    for revision in range(1, 101):
        mainloop.reconfigure(config_with(revision, 1_000 + revision))
        use(mainloop)
    assert psutil.Process().num_fds() <= open_files
    assert mainloop.messaging_agent.config_revision == 100
    assert mainloop.messaging_agent.max_queued_messages == 1_100
    assert mainloop.updater.config.general.config_revision == 100
    assert mainloop.updater.answers.messaging_agent is mainloop.messaging_agent
    newest = mainloop.messaging_agent.get_n_latest_messages(1_000)[-1]
    assert newest.config_revision == 100  # messages carry the new revision


def test_a_failing_main_loop_stops_its_children_before_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the chaos harness's full disk: a main loop that failed waited at exit
    # for children nobody stopped, holding the lock, so no restart took over
    mainloop = Mainloop(config_with(0, 1_000))

    def fail_after_starting_children() -> None:
        mainloop.start_children()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mainloop, "_run", fail_after_starting_children)
    children: list[int] = []
    start_children = mainloop.start_children

    def start_and_note() -> None:
        start_children()
        children.extend(m.process.pid for m in mainloop.managers if m.process and m.process.pid)

    monkeypatch.setattr(mainloop, "start_children", start_and_note)
    with pytest.raises(OSError, match="No space left"):
        mainloop.run()
    assert mainloop.managers == []
    assert children and not any(psutil.pid_exists(pid) for pid in children)


def with_destinations(*names: str) -> Config:
    config: dict[str, Any] = template_config_dict()
    config["backend"] = None
    config["backends"] = {
        name: {
            "provider": "thingsboard",
            "mqtt_host": "127.0.0.1",
            "mqtt_port": 1,
            "mqtt_client_id": f"ivy-{name}",
        }
        for name in names
    }
    return Config.model_validate(config)


def test_a_candidate_version_keeps_the_rows_of_a_destination_its_config_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # its guard may still roll it back to the version that sends them
    mainloop = Mainloop(with_destinations("research", "monitoring"))
    mainloop.sync_destinations()
    mainloop.messaging_agent.add_message(DataMessageBody(data={"x": 1}))
    assert mainloop.messaging_agent.get_queue_depth("monitoring") == 1

    monkeypatch.setenv(GUARD_ENVIRONMENT_VARIABLE, str(os.getppid()))
    mainloop.reconfigure(with_destinations("research"))
    mainloop.sync_destinations()
    assert mainloop.messaging_agent.get_queue_depth("monitoring") == 1

    # the committed version (no guard any more) lets them go
    monkeypatch.delenv(GUARD_ENVIRONMENT_VARIABLE)
    mainloop.sync_destinations()
    assert "monitoring" not in mainloop.messaging_agent.destinations
    warnings = [
        item.message_body.subject
        for item in mainloop.messaging_agent.get_n_latest_messages(10)
        if isinstance(item.message_body, LogMessageBody)
    ]
    assert any(
        "destination monitoring is no longer configured: 1 message" in w for w in warnings
    ), warnings
