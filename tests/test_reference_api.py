"""Every name of the reference API (`shared/reference-api.txt`) that procedure
authors write against exists with the documented parameters, so that drift
fails the suite. Ivy may add optional parameters after the documented ones; it
may not rename, reorder or require more."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

pytestmark = pytest.mark.quick

# (module, dotted attribute, documented parameters or None for a non-callable)
REFERENCE: list[tuple[str, str, list[str] | None]] = [
    ("run", "main", []),  # run.py: load .env, take the lock, run the main loop
    ("src.constants", "PROJECT_DIR", None),
    ("src.constants", "DATA_DIR", None),
    ("src.constants", "VERSION", None),
    ("src.constants", "NAME", None),
    ("src.constants", "DEFAULT_ROOT_DIR", None),
    ("src.constants", "ROOT_DIR", None),
    ("src.constants", "LOGGING_LEVEL_PRIORITIES", None),
    ("src.constants", "SECONDS_PER_GRACEFUL_PROCEDURE_TEARDOWN", None),
    ("src.main", "run", []),
    ("src.backend.tenta_backend", "run", ["config", "name", "teardown_indicator"]),
    ("src.backend.thingsboard_backend", "run", ["config", "name", "teardown_indicator"]),
    ("src.procedures.dummy_procedure", "run", ["config", "name"]),
    ("src.procedures.system_checks", "run", ["config", "name"]),
    ("src.types.config", "BackendConfig", None),
    ("src.types.config", "Config.dump", ["self"]),
    ("src.types.config", "Config.load", []),
    ("src.types.config", "Config.load_from_string", ["c"]),
    ("src.types.config", "Config.load_template", []),
    ("src.types.config", "Config.to_foreign_config", ["self"]),
    ("src.types.config", "ForeignConfig.dump", ["self"]),
    ("src.types.config", "ForeignConfig.load_from_string", ["c"]),
    ("src.types.config", "ForeignGeneralConfig", None),
    ("src.types.config", "MQTTBrokerConfig", None),
    ("src.types.config", "UpdaterConfig", None),
    ("src.types.messages", "ConfigMessageBody", None),
    ("src.types.messages", "DataMessageBody", None),
    ("src.types.messages", "LogMessageBody", None),
    ("src.types.messages", "MessageArchiveItem", None),
    ("src.types.messages", "MessageQueueItem", None),
    ("src.types.state", "State", None),
    ("src.types.state", "SystemState", None),
    ("src.utils.functions", "get_time_to_next_datapoint", ["seconds_between_datapoints"]),
    ("src.utils.functions", "log_level_is_visible", ["min_log_level", "log_level"]),
    (
        "src.utils.functions",
        "publish_mqtt_message",
        ["topic", "message", "host", "port", "username", "password", "sleep"],
    ),
    ("src.utils.functions", "with_automation_lock", []),
    (
        "src.utils.lifecycle_manager",
        "LifecycleManager.__init__",
        ["self", "config", "entrypoint", "name", "variant"],
    ),
    ("src.utils.lifecycle_manager", "LifecycleManager.check_procedure_status", ["self"]),
    ("src.utils.lifecycle_manager", "LifecycleManager.procedure_is_running", ["self"]),
    ("src.utils.lifecycle_manager", "LifecycleManager.start_procedure", ["self"]),
    ("src.utils.lifecycle_manager", "LifecycleManager.teardown", ["self"]),
    ("src.utils.logger", "Logger.__init__", ["self", "config", "origin"]),
    ("src.utils.logger", "Logger.debug", ["self", "message", "details"]),
    ("src.utils.logger", "Logger.info", ["self", "message", "details"]),
    ("src.utils.logger", "Logger.warning", ["self", "message", "details"]),
    ("src.utils.logger", "Logger.error", ["self", "message", "details"]),
    ("src.utils.logger", "Logger.exception", ["self", "e", "label", "details"]),
    ("src.utils.logger", "Logger.horizontal_line", ["self", "fill_char"]),
    ("src.utils.logger", "Logger.read_current_log_file", []),
    ("src.utils.mainloop_toggle", "SCRIPT_PATH", None),
    ("src.utils.mainloop_toggle", "MainloopToggle.get_mainloop_pids", []),
    ("src.utils.mainloop_toggle", "MainloopToggle.start_mainloop", []),
    ("src.utils.mainloop_toggle", "MainloopToggle.stop_mainloop", []),
    ("src.utils.messaging_agent", "ACTIVE_QUEUE_FILE", None),
    ("src.utils.messaging_agent", "MESSAGE_ARCHIVE_DIR", None),
    ("src.utils.messaging_agent", "MESSAGE_ARCHIVE_DIR_LOCK", None),
    ("src.utils.messaging_agent", "MessagingAgent.__init__", ["self"]),
    ("src.utils.messaging_agent", "MessagingAgent.add_message", ["self", "message_body"]),
    ("src.utils.messaging_agent", "MessagingAgent.get_message_archive_file", []),
    (
        "src.utils.messaging_agent",
        "MessagingAgent.get_n_latest_messages",
        ["self", "n", "excluded_message_ids"],
    ),
    ("src.utils.messaging_agent", "MessagingAgent.load_message_archive", ["date"]),
    ("src.utils.messaging_agent", "MessagingAgent.remove_messages", ["self", "message_ids"]),
    ("src.utils.messaging_agent", "MessagingAgent.teardown", ["self"]),
    ("src.utils.state_interface", "STATE_FILE", None),
    ("src.utils.state_interface", "STATE_FILE_LOCK", None),
    ("src.utils.state_interface", "StateInterface.load", []),
    ("src.utils.state_interface", "StateInterface.update", []),
    ("src.utils.updater", "Updater.__init__", ["self", "config"]),
    (
        "src.utils.updater",
        "Updater.download_source_code",
        ["updater_config", "version", "log_progress"],
    ),
    ("src.utils.updater", "Updater.update_cli_pointer", ["to_version"]),
    ("src.utils.updater", "Updater.remove_old_venvs", ["current_version", "log_progress"]),
    (
        "src.utils.updater",
        "Updater.install_dependencies",
        ["version", "log_progress", "installation_command"],
    ),
    ("src.utils.updater", "Updater.run_pytests", ["version", "pytest_marker"]),
    ("src.utils.updater", "Updater.perform_update", ["self", "foreign_config"]),
]


def _resolve(module_name: str, dotted: str) -> Any:
    value: Any = importlib.import_module(module_name)
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _static_or_method(module_name: str, dotted: str) -> Any:
    """The raw attribute, so that a staticmethod is told from a method."""
    if "." not in dotted:
        return _resolve(module_name, dotted)
    owner_name, attribute = dotted.rsplit(".", 1)
    owner = _resolve(module_name, owner_name)
    return inspect.getattr_static(owner, attribute)


@pytest.mark.parametrize(
    ("module_name", "dotted", "parameters"), REFERENCE, ids=[f"{m}:{d}" for m, d, _ in REFERENCE]
)
def test_reference_name_exists_with_its_documented_parameters(
    module_name: str, dotted: str, parameters: list[str] | None
) -> None:
    value = _resolve(module_name, dotted)
    if parameters is None:
        return
    signature = inspect.signature(value)
    found = list(signature.parameters.values())
    assert [p.name for p in found[: len(parameters)]] == parameters, (
        f"{module_name}.{dotted}{signature} differs from the reference {parameters}"
    )
    extra = [p.name for p in found[len(parameters) :] if p.default is inspect.Parameter.empty]
    assert extra == [], f"{module_name}.{dotted} requires more than the reference: {extra}"
    if "self" not in parameters and "." in dotted and not dotted.endswith("__init__"):
        raw = _static_or_method(module_name, dotted)
        assert isinstance(raw, staticmethod), f"{dotted} must be a staticmethod"


def test_reference_optional_arguments_are_optional() -> None:
    """`details` (and `label`) may be left out, as the reference's examples do."""
    from src.utils.logger import Logger

    for name in ("debug", "info", "warning", "error"):
        assert inspect.signature(getattr(Logger, name)).parameters["details"].default is None
    exception = inspect.signature(Logger.exception).parameters
    assert exception["label"].default is None and exception["details"].default is None
