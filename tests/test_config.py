"""Config validation: every constraint an operator can violate, with the error
message it produces; secrets never leak."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pydantic
import pytest

from src.types import Config, ConfigError, ForeignConfig
from src.types import config as config_module
from src.types.config import (
    SECRET_FIELD_NAMES,
    procedure_sections,
    redact_secrets,
    register_procedure_sections,
)
from tests.conftest import template_config_dict

pytestmark = pytest.mark.quick

BACKEND = {
    "provider": "tenta",
    "mqtt_host": "broker.example.org",
    "mqtt_client_id": "station-1",
    "mqtt_username": "station",
    "mqtt_password": "hunter2-secret",
}
UPDATER = {"source": "github", "repository": "example/ivy", "access_token": "tok-123-secret"}


SENSOR_UUID = "8c4f4b5e-2f36-4d3b-9c41-6a1f0e2b7d90"


def full_config() -> dict[str, Any]:
    config = template_config_dict()
    config["general"]["system_identifier"] = SENSOR_UUID
    config["backend"] = copy.deepcopy(BACKEND)
    config["updater"] = copy.deepcopy(UPDATER)
    return config


def error_for(path: str, value: Any) -> str:
    config = full_config()
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError) as info:
        Config.load_from_string(json.dumps(config))
    return str(info.value)


def test_template_is_valid() -> None:
    config = Config.load_template()
    assert config.backend is None
    assert config.enabled_procedure_names() == ["dummy_procedure", "system_checks"]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("general.system_identifier", "a/b", "general.system_identifier: String should match"),
        ("general.system_identifier", "", "general.system_identifier: String should match"),
        ("general.system_identifier", "ok\n", "general.system_identifier: String should match"),
        ("general.system_identifier", "site.1", "general.system_identifier: String should match"),
        ("general.system_identifier", "a+b", "general.system_identifier: String should match"),
        ("general.system_identifier", "my-station", "general.system_identifier: with the Tenta"),
        ("general.config_revision", -1, "general.config_revision: Input should be greater"),
        ("general.config_revision", "x", "general.config_revision: Input should be a valid int"),
        ("general.config_revision", "8", "general.config_revision: Input should be a valid int"),
        ("general.config_revision", 8.0, "general.config_revision: Input should be a valid int"),
        ("general.config_revision", True, "general.config_revision: Input should be a valid int"),
        ("general.config_revision", 2**31, "general.config_revision: Input should be less than"),
        ("general.config_revision", 10**30, "general.config_revision: Input should be less than"),
        ("general.software_version", "1" * 40 + ".0.0", "general.software_version: Value error"),
        ("storage.max_queued_messages", 10**12, "max_queued_messages: Input should be less"),
        ("storage.retention_days", 10**6, "storage.retention_days: Input should be less"),
        ("backend.mqtt_port", "1883", "backend.mqtt_port: Input should be a valid integer"),
        ("backend.tls", {"ca_file": "/" * 5_000}, "tls.ca_file: String should have at most"),
        ("general.software_version", "1.2", "general.software_version: String should match"),
        ("general.software_version", "v1.2.3", "general.software_version: String should match"),
        ("logging_verbosity.console_prints", "LOUD", "logging_verbosity.console_prints: Input"),
        ("logging_verbosity.file_archive", "info", "logging_verbosity.file_archive: Input"),
        ("logging_verbosity.message_sending", 3, "logging_verbosity.message_sending: Input"),
        ("storage.sqlite_synchronous", "OFF", "storage.sqlite_synchronous: Input should be"),
        ("storage.max_queued_messages", 10, "storage.max_queued_messages: Input should be greater"),
        ("storage.retention_days", 0, "storage.retention_days: Input should be greater"),
        ("updater.source", "ftp", "updater.source: Input should be 'github', 'gitlab' or 'git'"),
        ("updater.repository", "a b", "updater.repository: String should match"),
        ("updater.host", "exa mple.org", "updater.host: String should match"),
        ("updater.allow_downgrades", "maybe", "updater.allow_downgrades: Input should be a valid"),
        ("backend.provider", "aws", "backend.provider: Input should be 'tenta' or 'thingsboard'"),
        ("backend.mqtt_host", "bad host", "backend.mqtt_host: String should match"),
        ("backend.mqtt_host", "-leading.dash", "backend.mqtt_host: String should match"),
        ("backend.mqtt_port", 0, "backend.mqtt_port: Input should be greater than or equal to 1"),
        ("backend.mqtt_port", 70000, "backend.mqtt_port: Input should be less than or equal"),
        ("backend.mqtt_client_id", "a#b", "backend.mqtt_client_id: String should match"),
        ("backend.mqtt_username", "u" * 300, "backend.mqtt_username: String should have at most"),
        ("backend.mqtt_protocol", "3", "backend.mqtt_protocol: Input should be '3.1.1' or '5'"),
        ("backend.max_parallel_messages", 0, "backend.max_parallel_messages: Input should be"),
        ("backend.max_payload_bytes", 100, "backend.max_payload_bytes: Input should be greater"),
        ("backend.max_drain_time", -1, "backend.max_drain_time: Input should be greater"),
        ("backend.tls", {"client_cert_file": "/c.pem"}, "backend.tls: Value error, client_cert"),
        (
            "backend.tls",
            {"check_hostname": "sometimes"},
            "backend.tls.check_hostname: Input should be",
        ),
        ("dummy_procedure.seconds_between_datapoints", 0, "seconds_between_datapoints: Input"),
        ("system_checks.seconds_between_checks", 1, "system_checks.seconds_between_checks: Input"),
        ("general.unknown_key", 1, "general.unknown_key: Extra inputs are not permitted"),
    ],
)
def test_each_constraint_names_field_and_value(path: str, value: Any, expected: str) -> None:
    message = error_for(path, value)
    assert expected in message
    if isinstance(value, (int, str)) and path.split(".")[-1] != "unknown_key":
        assert json.dumps(value)[:60] in message  # the value found is shown (truncated)


def test_missing_required_field_is_named() -> None:
    config = full_config()
    del config["general"]["system_identifier"]
    with pytest.raises(ConfigError, match=r"general\.system_identifier: Field required"):
        Config.load_from_string(json.dumps(config))


def test_invalid_json_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="Invalid JSON"):
        Config.load_from_string('{"general": ', source="config.json")


def test_missing_file_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        Config.load(str(tmp_path / "nope.json"))


def test_secret_values_never_appear_in_errors() -> None:
    config = full_config()
    config["backend"]["mqtt_password"] = 12345  # wrong type: the value must stay hidden
    config["backend"]["mqtt_port"] = "hunter2-secret"
    with pytest.raises(ConfigError) as info:
        Config.load_from_string(json.dumps(config))
    assert "12345" not in str(info.value)
    assert "backend.mqtt_password" in str(info.value)


def test_secrets_redacted_in_json_but_kept_in_dump(tmp_path: Any) -> None:
    config = Config.load_from_string(json.dumps(full_config()))
    assert "hunter2-secret" not in config.to_json()
    assert "tok-123-secret" not in repr(config)
    path = str(tmp_path / "config.json")
    config.dump(path)
    reloaded = Config.load(path)
    assert reloaded.backend is not None and reloaded.backend.mqtt_password is not None
    assert reloaded.backend.mqtt_password.get_secret_value() == "hunter2-secret"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp files left


def test_secret_field_names_cover_every_secret() -> None:
    assert SECRET_FIELD_NAMES == {"mqtt_password", "access_token"}
    redacted = redact_secrets(full_config())
    assert "hunter2-secret" not in json.dumps(redacted)
    assert "tok-123-secret" not in json.dumps(redacted)


def test_foreign_config_needs_only_revision_and_version() -> None:
    foreign = ForeignConfig.model_validate(
        {"general": {"config_revision": 3, "software_version": "9.9.9", "new": 1}, "x": {}}
    )
    assert foreign.general.config_revision == 3
    assert foreign.to_dict()["x"] == {}
    with pytest.raises(ValueError, match="config_revision"):
        ForeignConfig.model_validate({"general": {"software_version": "1.0.0"}})


@pytest.mark.parametrize(
    ("revision", "problem"),
    [("8", "valid integer"), (True, "valid integer"), (-1, "greater"), (2**31, "less than")],
)
def test_foreign_config_revisions_are_strict_and_bounded(revision: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ForeignConfig.model_validate(
            {"general": {"config_revision": revision, "software_version": "0.1.0"}}
        )


def test_to_foreign_config_keeps_secrets_for_applying() -> None:
    config = Config.load_from_string(json.dumps(full_config()))
    assert config.to_foreign_config().to_dict()["backend"]["mqtt_password"] == "hunter2-secret"


def test_secrets_of_a_procedure_section_are_redacted_too() -> None:
    class InstrumentConfig(pydantic.BaseModel):
        api_key: pydantic.SecretStr

    sections, secret_names = procedure_sections(), set(SECRET_FIELD_NAMES)
    register_procedure_sections({"instrument": InstrumentConfig})
    try:
        config = full_config()
        config["instrument"] = {"api_key": "instrument-secret-1"}
        loaded = Config.load_from_string(json.dumps(config))
        assert "instrument-secret-1" not in loaded.to_json()
        assert "instrument-secret-1" not in json.dumps(redact_secrets(config))
    finally:  # the registry is process-wide: leave it as it was
        config_module._PROCEDURE_SECTIONS.clear()
        config_module._PROCEDURE_SECTIONS.update(sections)
        SECRET_FIELD_NAMES.intersection_update(secret_names)
