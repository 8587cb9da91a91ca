"""Log channels, levels, and secrets."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from src import constants
from src.types import Config
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from tests.conftest import template_config_dict

pytestmark = pytest.mark.quick


def config_with(**verbosity: str | None) -> Config:
    config = template_config_dict()
    config["logging_verbosity"].update(verbosity)
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "localhost",
        "mqtt_client_id": "c",
        "mqtt_password": "pa55-word-secret",
    }
    return Config.model_validate(config)


def log_file_content() -> str:
    return Logger.read_current_log_file() or ""


def test_each_channel_has_its_own_level(capsys: Any) -> None:
    logger = Logger(
        config_with(console_prints="WARNING", file_archive="INFO", message_sending="ERROR"),
        "tester",
    )
    logger.debug("d-line")
    logger.info("i-line")
    logger.warning("w-line")
    logger.error("e-line", details="more\nlines")
    console = capsys.readouterr().out
    assert "i-line" not in console and "w-line" in console and "e-line" in console
    file = log_file_content()
    assert "d-line" not in file and "i-line" in file
    assert "tester - ERROR - e-line\n    more\n    lines\n" in file
    messages = MessagingAgent().get_n_latest_messages(10)
    assert [m.body.model_dump()["subject"] for m in messages] == ["tester - e-line"]


def test_channels_can_be_turned_off(capsys: Any) -> None:
    logger = Logger(
        config_with(console_prints=None, file_archive=None, message_sending=None), "quiet"
    )
    logger.error("nothing anywhere")
    assert capsys.readouterr().out == ""
    assert log_file_content() == ""
    assert MessagingAgent().get_queue_depth() == 0


def test_exceptions_carry_their_traceback() -> None:
    logger = Logger(config_with(message_sending="EXCEPTION"), "tester")
    try:
        raise ValueError("bad thing")
    except ValueError as e:
        logger.exception(e, label="while testing")
    assert "EXCEPTION - while testing: ValueError: bad thing" in log_file_content()
    assert "Traceback (most recent call last)" in log_file_content()
    body = MessagingAgent().get_n_latest_messages(1)[0].body.model_dump()
    assert body["level"] == "EXCEPTION" and "Traceback" in body["body"]


def test_secrets_never_reach_any_channel(capsys: Any) -> None:
    logger = Logger(config_with(console_prints="DEBUG", message_sending="DEBUG"), "leaky")
    logger.warning("connecting with pa55-word-secret", details="password=pa55-word-secret")
    outputs = [capsys.readouterr().out, log_file_content()]
    outputs.append(
        json.dumps([m.body.model_dump() for m in MessagingAgent().get_n_latest_messages(5)])
    )
    for output in outputs:
        assert "pa55-word-secret" not in output
        assert "**********" in output


def test_without_config_defaults_apply_and_nothing_is_sent() -> None:
    Logger(None, "early").warning("no config yet")
    assert "early - WARNING - no config yet" in log_file_content()
    assert MessagingAgent().get_queue_depth() == 0


def test_an_unwritable_log_file_never_raises(capsys: Any) -> None:
    # the chaos harness's full disk: the main loop's error handler raised,
    # ended the main loop and left its children unsupervised
    os.makedirs(os.path.dirname(constants.LOGS_DIR), exist_ok=True)
    with open(constants.LOGS_DIR, "w"):  # a file where the directory should be
        pass
    logger = Logger(config_with(console_prints=None, file_archive="INFO"), "tester")
    logger.info("still here")
    logger.exception(OSError(28, "No space left on device"), "failed")
    err = capsys.readouterr().err
    assert "log file not writable" in err and "still here" in err


def test_lines_logged_from_another_thread_are_queued_too() -> None:
    """paho's network thread logs through the backend's logger."""
    import threading

    logger = Logger(config_with(message_sending="INFO"), "threads")
    logger.info("from the main thread")
    thread = threading.Thread(target=logger.info, args=("from the network thread",))
    thread.start()
    thread.join()
    subjects = [m.body.model_dump()["subject"] for m in MessagingAgent().get_n_latest_messages(10)]
    assert subjects == ["threads - from the main thread", "threads - from the network thread"]
    assert "could not queue" not in log_file_content()
