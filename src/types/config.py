"""The station's config (`config/config.json`) and the looser `ForeignConfig`
that arrives over MQTT before it is validated in full.

Secrets are `SecretStr`: they print and serialize as `**********` everywhere
except in `Config.dump`, which writes them to the config file itself.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import pydantic
import tum_esm_utils.validators
from pydantic import Field, SecretStr
from pydantic_core import InitErrorDetails, PydanticCustomError

from src import constants

from .atomic_file import write_atomically
from .legacy_config import is_ivy_1_1_config, translate_ivy_1_1

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "EXCEPTION"]
MessageVariant = Literal["data", "log", "config"]

REDACTED = "**********"
_REVEAL_SECRETS = "reveal_secrets"


def _serialize_secret(value: SecretStr, info: pydantic.SerializationInfo) -> str:
    if isinstance(info.context, dict) and info.context.get(_REVEAL_SECRETS):
        return value.get_secret_value()
    return REDACTED


SecretString = Annotated[SecretStr, pydantic.PlainSerializer(_serialize_secret, return_type=str)]

# anchored: a pattern without ^...$ would accept any string containing a match
_HOSTNAME_PATTERN = r"^([A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f:]{2,39})$"
# characters every broker keeps as they are in a topic level (RabbitMQ maps
# "." to "/"; "+" and "#" are wildcards)
_IDENTIFIER_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Tenta's sensor identifiers (its validation/constants.py): lowercase UUID v4
TENTA_IDENTIFIER_PATTERN = r"^[a-f0-9]{8}-[a-f0-9]{4}-4[a-f0-9]{3}-[89ab][a-f0-9]{3}-[a-f0-9]{12}$"
_HOST_AND_PORT_PATTERN = _HOSTNAME_PATTERN[:-1] + r"(:[0-9]{1,5})?$"
_CLIENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


# a destination's name, stable: its queue cursor and counters are keyed by it
DESTINATION_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
# the name of the reference API's single `backend` section as a destination
LEGACY_DESTINATION = "backend"


def destination_process_name(destination: str) -> str:
    """The name of a destination's backend process (and its log origin):
    "backend" for the `backend` section, "backend:<name>" for the others."""
    return destination if destination == LEGACY_DESTINATION else f"backend:{destination}"


def destination_of_process(process: str) -> str:
    """The destination a backend process named `process` serves."""
    return process.split(":", 1)[1] if process.startswith("backend:") else LEGACY_DESTINATION


def _location_of(destination: str) -> tuple[str, ...]:
    return ("backend",) if destination == LEGACY_DESTINATION else ("backends", destination)


# revisions live in Tenta's int4 columns and in SQLite; nothing larger is
# accepted, so that no remote config can overflow either
REVISION_LIMIT = 2**31
_PATH_MAX_LENGTH = 4_096
_SECRET_MAX_LENGTH = 1_024
_VERSION_MAX_LENGTH = 32


class _Section(tum_esm_utils.validators.StricterBaseModel):
    """A config section: unknown keys are errors, so that typos are caught, and
    no value is coerced (a remote "8" is not the integer 8)."""

    model_config = pydantic.ConfigDict(strict=True)


def _short_version(
    version: tum_esm_utils.validators.Version,
) -> tum_esm_utils.validators.Version:
    if len(version.root) > _VERSION_MAX_LENGTH:
        raise ValueError(f"at most {_VERSION_MAX_LENGTH} characters")
    return version


Version = Annotated[tum_esm_utils.validators.Version, pydantic.AfterValidator(_short_version)]
Revision = Annotated[int, Field(ge=0, lt=REVISION_LIMIT)]


def is_valid_revision(value: Any) -> bool:
    """Whether `value` is a revision a config may carry (a strict integer in
    0 <= r < 2**31)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < REVISION_LIMIT


def general_field_of(raw: Any, name: str) -> Any:
    """`general.<name>` of raw JSON data that may not be a config at all."""
    general = raw.get("general") if isinstance(raw, dict) else None
    return general.get(name) if isinstance(general, dict) else None


def revision_of(raw: Any) -> int | None:
    """`general.config_revision` of raw JSON data, if it is a valid revision."""
    revision = general_field_of(raw, "config_revision")
    return revision if is_valid_revision(revision) else None


class GeneralConfig(_Section):
    system_identifier: str = Field(
        ...,
        pattern=_IDENTIFIER_PATTERN,
        description=(
            "Name of this station; used in MQTT topics. Letters, digits, _ and -; "
            "with the Tenta backend, the sensor's UUID in Tenta (lowercase)."
        ),
    )
    config_revision: Revision = Field(
        ...,
        description=(
            "Revision of this config. A remote config is applied only if its revision is "
            "at least this one and higher than the last one handled; a station that has "
            "handled none accepts its current revision too (Tenta's first is 0)."
        ),
    )
    software_version: Version = Field(
        ..., description="Ivy version this config is written for, e.g. 0.1.0."
    )


class LoggingVerbosityConfig(_Section):
    console_prints: LogLevel | None = Field(
        "INFO", description="Minimum level printed to stdout; null turns the channel off."
    )
    file_archive: LogLevel | None = Field(
        "DEBUG", description="Minimum level written to data/logs/YYYY-MM-DD.log; null: off."
    )
    message_sending: LogLevel | None = Field(
        "WARNING", description="Minimum level sent to the backend as log messages; null: off."
    )


class StorageConfig(_Section):
    sqlite_synchronous: Literal["NORMAL", "FULL", "EXTRA"] = Field(
        "FULL",
        description="SQLite `synchronous` of the message queue. FULL survives power loss.",
    )
    max_queued_messages: int = Field(
        5_000_000,
        ge=1_000,
        le=1_000_000_000,
        description=(
            "Cap on queued messages not yet sent; above it the oldest data messages are "
            "dropped first, config acknowledgements last. Messages sent and awaiting the "
            "broker's acknowledgement are never dropped (they may have arrived), so the "
            "dropped count is exactly what the broker never got."
        ),
    )
    retention_days: int = Field(
        365,
        ge=1,
        le=36_500,
        description="Message archive and log files older than this are deleted.",
    )


class UpdaterConfig(_Section):
    source: Literal["github", "gitlab", "git"] = Field(
        ..., description="Where new versions come from."
    )
    repository: str = Field(
        ...,
        pattern=r"^\S{1,512}$",
        description="owner/name (github, gitlab) or a git URL or local path (git).",
    )
    host: str | None = Field(
        None,
        pattern=_HOST_AND_PORT_PATTERN,
        description="GitLab host (optionally :port); null for gitlab.com.",
    )
    access_token: SecretString | None = Field(
        None,
        max_length=_SECRET_MAX_LENGTH,
        description="Token for private repositories; sent in a header, never logged.",
    )
    allow_downgrades: bool = Field(False, description="Accept configs with a lower version.")

    @pydantic.field_validator("repository")
    @classmethod
    def _no_credentials_in_the_url(cls, repository: str) -> str:
        # a URL's user:token part would reach git's command line and its errors
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@", repository):
            raise ValueError("credentials in the URL are refused: put the token in access_token")
        return repository


class TrialConfig(_Section):
    """How a new config or software version is judged before it is kept
    (the config under trial brings its own settings)."""

    deadline_seconds: int = Field(
        300,
        ge=30,
        le=3600,
        description="Healthy by then, or the previous config or version comes back.",
    )
    stable_seconds: int = Field(
        30,
        ge=1,
        le=1800,
        description="How long every procedure and the backend must run without a restart.",
    )
    max_starts: int = Field(
        3, ge=1, le=10, description="Starts of a new version's main loop before it is given up."
    )

    @pydantic.model_validator(mode="after")
    def _stable_within_deadline(self) -> TrialConfig:
        if self.stable_seconds >= self.deadline_seconds:
            raise ValueError("stable_seconds must be shorter than deadline_seconds")
        return self


class TLSConfig(_Section):
    ca_file: str | None = Field(
        None, max_length=_PATH_MAX_LENGTH, description="CA bundle; null: the system's CAs."
    )
    client_cert_file: str | None = Field(
        None, max_length=_PATH_MAX_LENGTH, description="Client certificate (PEM)."
    )
    client_key_file: str | None = Field(
        None, max_length=_PATH_MAX_LENGTH, description="Client private key (PEM)."
    )
    check_hostname: bool = Field(True, description="Check the broker's hostname.")

    @pydantic.model_validator(mode="after")
    def _cert_and_key_together(self) -> TLSConfig:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file must be given together")
        return self


@functools.cache
def backend_provider_names() -> tuple[str, ...]:
    """The providers the backend modules offer, one per module
    `src/backend/<provider>_backend.py`, read from the directory listing (no
    import: this layer cannot import backends, and most processes never do)."""
    directory = os.path.join(constants.PROJECT_DIR, "src", "backend")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    suffix = "_backend.py"
    return tuple(sorted(n[: -len(suffix)] for n in names if n.endswith(suffix)))


def _provider_enum(schema: dict[str, Any]) -> None:
    schema["enum"] = list(backend_provider_names())


class BrokerAddress(_Section):
    """One address of a broker service."""

    mqtt_host: str = Field(..., pattern=_HOSTNAME_PATTERN, description="Broker host.")
    mqtt_port: int = Field(1883, ge=1, le=65535, description="Broker port.")


class BrokerConnection(_Section):
    """How to reach and log in to an MQTT broker: a backend section's
    connection fields, and the `broker` of a fleet inventory."""

    mqtt_host: str = Field(..., pattern=_HOSTNAME_PATTERN, description="Broker host.")
    mqtt_port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    mqtt_client_id: str = Field(
        ..., pattern=_CLIENT_ID_PATTERN, description="MQTT client id (persistent session)."
    )
    mqtt_username: str | None = Field(
        None, max_length=256, description="Username; the device token for ThingsBoard."
    )
    mqtt_password: SecretString | None = Field(
        None, max_length=_SECRET_MAX_LENGTH, description="Password."
    )
    mqtt_protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT version.")
    tls: TLSConfig | None = Field(None, description="TLS settings; null: plain TCP.")


class BackendConfig(BrokerConnection):
    provider: str = Field(..., description="Protocol spoken.", json_schema_extra=_provider_enum)

    @pydantic.field_validator("provider")
    @classmethod
    def _known_provider(cls, provider: str) -> str:
        known = backend_provider_names()
        if provider not in known:
            expected = " or ".join(", ".join(repr(n) for n in known).rsplit(", ", 1))
            raise PydanticCustomError(
                "literal_error", "Input should be {expected}", {"expected": expected}
            )
        return provider

    max_parallel_messages: int = Field(
        50, ge=1, le=10_000, description="Publishes awaiting their PUBACK at once."
    )
    max_payload_bytes: int = Field(
        64_000, ge=1_024, le=10_000_000, description="Upper bound of one publish's payload."
    )
    max_drain_time: int = Field(
        60, ge=0, le=3_600, description="Seconds to keep draining the queue on teardown."
    )
    reconnect_max_seconds: int = Field(
        60,
        ge=1,
        le=3_600,
        description=(
            "Longest wait between reconnect attempts; each wait is random up to a window "
            "that doubles per failure up to this (so that stations behind a broker that "
            "restarts spread out)."
        ),
    )
    failover: list[BrokerAddress] = Field(
        default_factory=list,
        max_length=8,
        description=(
            "More addresses of the same broker service, tried in order when the primary "
            "(mqtt_host, mqtt_port) does not answer; while on one of them, the backend keeps "
            "trying to return to the primary. TLS settings are shared: each host must be "
            "one the certificate names."
        ),
    )
    failover_probe_seconds: int = Field(
        30,
        ge=1,
        le=3_600,
        description="While on a failover address, how often the primary is tried again.",
    )
    variants: list[MessageVariant] = Field(
        default_factory=lambda: list(get_args(MessageVariant)),
        min_length=1,
        description="Which messages this destination gets (e.g. data only for a dashboard).",
    )
    max_queued_messages: int | None = Field(
        None,
        ge=1_000,
        le=1_000_000_000,
        description=(
            "This destination's own cap on messages it has not got yet (null: "
            "storage.max_queued_messages); above it its oldest data are dropped for it alone, "
            "counted, and named in a gap record it receives once it is back."
        ),
    )
    max_messages_per_second: float | None = Field(
        None, gt=0, le=1_000_000, description="Rate limit of this destination (null: none)."
    )
    max_bytes_per_second: int | None = Field(
        None, ge=1_024, le=10**10, description="Byte rate limit of this destination (null: none)."
    )
    catch_up: Literal["oldest_first", "newest_first"] = Field(
        "oldest_first",
        description=(
            "After an outage, send the data backlog oldest first, or what is measured now "
            "first and the backlog after it (for dashboards that care about the present); "
            "logs and config answers always go first, and everything arrives either way."
        ),
    )

    report_state: bool = Field(
        True,
        description=(
            "Tenta: publish the station's state (retained, ivy/<id>/state) and presence "
            "(ivy/<id>/presence, offline by the broker's last will) for `ivy fleet`; turn "
            "off where the broker's ACL refuses those topics."
        ),
    )

    def addresses(self) -> list[BrokerAddress]:
        """The primary address, then the failover ones."""
        return [BrokerAddress(mqtt_host=self.mqtt_host, mqtt_port=self.mqtt_port), *self.failover]


# the reference API's name for the broker settings of the backend section
MQTTBrokerConfig = BackendConfig


# One section per procedure module, registered by `src.procedures` when it
# discovers them (this layer cannot import procedures): name -> its config
# model, or None for a module that failed to load (its section is kept as it
# is, so that one broken module does not make the whole config invalid).
_PROCEDURE_SECTIONS: dict[str, type[pydantic.BaseModel] | None] = {}

SectionT = TypeVar("SectionT", bound=pydantic.BaseModel)


def register_procedure_sections(sections: Mapping[str, type[pydantic.BaseModel] | None]) -> None:
    """Make `Config` accept and validate one section per procedure. Called by
    `src.procedures` once it has discovered the procedure modules."""
    _PROCEDURE_SECTIONS.update(sections)
    for model in sections.values():
        if model is not None:
            SECRET_FIELD_NAMES.update(_collect_secret_field_names(model))


@functools.cache
def _procedure_module_names() -> frozenset[str]:
    """The procedure modules' names from the directory listing (no import):
    which sections a config may have in a process that never imported
    `src.procedures` (scripts, tools); their content is validated where the
    procedures are registered (main loop, CLI)."""
    directory = os.path.join(constants.PROJECT_DIR, "src", "procedures")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return frozenset(n[:-3] for n in names if n.endswith(".py") and not n.startswith("_"))


def procedure_sections() -> dict[str, type[pydantic.BaseModel] | None]:
    """The registered procedure sections, for the config reference."""
    return dict(_PROCEDURE_SECTIONS)


class ConfigError(Exception):
    """A config could not be read or validated; the message names every bad
    field and the value it had (secrets redacted)."""


class Config(tum_esm_utils.validators.StricterBaseModel):
    """The whole station config: the sections below, plus one section per
    procedure module (`src/procedures/<name>.py`); a procedure whose section
    is null or absent does not run. `backend: null` keeps every message in the
    local queue and archive."""

    # procedure sections arrive as extra keys; `_check_sections` validates
    # each with its procedure's model and refuses any other key
    model_config = pydantic.ConfigDict(strict=True, extra="allow")

    _migration_notice: str | None = pydantic.PrivateAttr(default=None)
    general: GeneralConfig
    logging_verbosity: LoggingVerbosityConfig = Field(default_factory=LoggingVerbosityConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    updater: UpdaterConfig | None = None
    backend: BackendConfig | None = None
    backends: dict[Annotated[str, Field(pattern=DESTINATION_NAME_PATTERN)], BackendConfig] = Field(
        default_factory=dict,
        description=(
            "More destinations by name, each a backend section of its own (its own process, "
            'queue cursor, cap and broker); `backend` is one more, named "backend".'
        ),
    )
    trial: TrialConfig = Field(default_factory=TrialConfig)

    @pydantic.model_validator(mode="after")
    def _check_sections(self) -> Config:
        errors: list[InitErrorDetails] = []
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for name, value in extra.items():
            if name not in _PROCEDURE_SECTIONS:
                if name not in _procedure_module_names():
                    errors.append({"type": "extra_forbidden", "loc": (name,), "input": value})
                continue  # a process that never imported src.procedures: kept as it is
            model = _PROCEDURE_SECTIONS[name]
            if model is None or value is None or isinstance(value, model):
                continue
            try:
                extra[name] = model.model_validate(value, strict=True)
            except pydantic.ValidationError as e:
                for error in e.errors():
                    errors.append(
                        {
                            "type": PydanticCustomError(error["type"], error["msg"]),
                            "loc": (name, *error["loc"]),
                            "input": error["input"],
                        }
                    )
        identifier = self.general.system_identifier
        if LEGACY_DESTINATION in self.backends:
            errors.append(
                {
                    "type": PydanticCustomError(
                        "reserved_name", '"backend" names the backend section; choose another'
                    ),
                    "loc": ("backends", LEGACY_DESTINATION),
                    "input": LEGACY_DESTINATION,
                }
            )
        destinations = self.destinations()
        client_ids: dict[str, str] = {}
        for name, section in destinations.items():
            other = client_ids.setdefault(section.mqtt_client_id, name)
            if other != name:
                errors.append(
                    {
                        "type": PydanticCustomError(
                            "client_id_twice",
                            "two destinations ({other} and {name}) cannot share an MQTT client id",
                            {"other": other, "name": name},
                        ),
                        "loc": (*_location_of(name), "mqtt_client_id"),
                        "input": section.mqtt_client_id,
                    }
                )
        if any(section.provider == "tenta" for section in destinations.values()) and not (
            re.match(TENTA_IDENTIFIER_PATTERN, identifier)
        ):
            errors.append(
                {
                    "type": PydanticCustomError(
                        "tenta_identifier",
                        "with the Tenta backend this must be the sensor's UUID in Tenta "
                        "(lowercase, version 4)",
                    ),
                    "loc": ("general", "system_identifier"),
                    "input": identifier,
                }
            )
        if errors:
            raise pydantic.ValidationError.from_exception_data("Config", errors)
        return self

    def destinations(self) -> dict[str, BackendConfig]:
        """Every destination by name: `backend` (named "backend"), then each of
        `backends`."""
        found = {LEGACY_DESTINATION: self.backend} if self.backend is not None else {}
        return {**found, **self.backends}

    def destination_routes(self) -> dict[str, tuple[frozenset[str], int]]:
        """Every destination's name -> the message variants it gets and its
        size cap (its own, or the storage's), as the queue registers them."""
        return {
            name: (
                frozenset(section.variants),
                section.max_queued_messages or self.storage.max_queued_messages,
            )
            for name, section in self.destinations().items()
        }

    def procedure_section(self, name: str, model: type[SectionT]) -> SectionT | None:
        """The validated section of procedure `name` (None: off). Called by
        procedures to read their own settings, typed."""
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        value = extra.get(name)
        if value is None:
            return None
        if not isinstance(value, model):
            value = extra[name] = model.model_validate(value, strict=True)
        return value

    def enabled_procedure_names(self) -> list[str]:
        """Names of the procedures whose section is set. Called by the main loop."""
        return [
            name for name, value in (self.__pydantic_extra__ or {}).items() if value is not None
        ]

    @staticmethod
    def load_from_string(c: str, source: str = "config") -> Config:
        """Parse and validate a JSON config; raise `ConfigError` naming every bad
        field. A config in Ivy 1.1's format is read as this version's
        (`migration_notice` then says how). Called by the main loop, the CLI
        and the updater."""
        notice: str | None = None
        try:
            raw = json.loads(c)
        except ValueError:
            raw = None  # pydantic names what is wrong with it below
        if is_ivy_1_1_config(raw):
            translation = translate_ivy_1_1(raw)
            c, notice = json.dumps(translation.config), translation.notice
        try:
            config = Config.model_validate_json(c)
        except pydantic.ValidationError as e:
            message = format_validation_error(e, source)
            raise ConfigError(f"{message}\n  ({notice})" if notice else message) from None
        config._migration_notice = notice
        return config

    @property
    def migration_notice(self) -> str | None:
        """How a config in Ivy 1.1's format was read (None: it was not)."""
        return self._migration_notice

    @staticmethod
    def load(path: str | None = None) -> Config:
        """Load `config/config.json`; raise `ConfigError` with a clear message when
        it is missing or invalid. Called by every process at its start."""
        path = path or constants.CONFIG_PATH
        try:
            with open(path, encoding="utf-8") as f:
                content = f.read()
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
        return Config.load_from_string(content, source=path)

    @staticmethod
    def load_template() -> Config:
        """Load the tracked `config/config.template.json`. Called by tests and by
        `ivy start` when no config exists yet."""
        return Config.load(constants.CONFIG_TEMPLATE_PATH)

    def dump(self, path: str | None = None) -> None:
        """Write this config atomically, secrets included. Called by the CLI and
        the updater when a new config is accepted."""
        write_atomically(path or constants.CONFIG_PATH, self.to_json(reveal_secrets=True) + "\n")

    def to_json(self, reveal_secrets: bool = False) -> str:
        """The config as indented JSON; secrets are redacted unless revealed."""
        return self.model_dump_json(indent=4, context={_REVEAL_SECRETS: reveal_secrets})

    def to_foreign_config(self) -> ForeignConfig:
        """This config as a `ForeignConfig`, secrets included, e.g. to queue it as
        pending in the state."""
        return ForeignConfig.model_validate_json(self.to_json(reveal_secrets=True))


class ForeignGeneralConfig(pydantic.BaseModel):
    """`general` of a config for any version: revision and version only."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)
    config_revision: Revision
    software_version: Version


class ForeignConfig(pydantic.BaseModel):
    """A config as received from the backend: only the revision and the version
    are checked up front; everything else is validated when it is applied, by the
    version that will run it."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)
    general: ForeignGeneralConfig

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON data, secrets included."""
        result: dict[str, Any] = json.loads(self.model_dump_json())
        return result

    @staticmethod
    def load_from_string(c: str) -> ForeignConfig:
        """Parse a received config (revision and version checked only); raise
        `ConfigError` naming every bad field."""
        try:
            return ForeignConfig.model_validate_json(c)
        except pydantic.ValidationError as e:
            raise ConfigError(format_validation_error(e, "received config")) from None

    def dump(self, path: str | None = None) -> None:
        """Write this config atomically as `config/config.json` (of this
        installation, or `path`), secrets included. Called by the updater when
        it installs a config for another version."""
        write_atomically(path or constants.CONFIG_PATH, json.dumps(self.to_dict(), indent=4) + "\n")


def _collect_secret_field_names(model: type[pydantic.BaseModel]) -> frozenset[str]:
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        annotation = field.annotation
        for candidate in get_args(annotation) or (annotation,):
            if get_origin(candidate) is Annotated:
                candidate = get_args(candidate)[0]
            if candidate is SecretStr:
                names.add(field_name)
            elif isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel):
                names |= _collect_secret_field_names(candidate)
    return frozenset(names)


# names of secret fields anywhere in a config: the core sections', plus those of
# each procedure section as it is registered
SECRET_FIELD_NAMES: set[str] = set(_collect_secret_field_names(Config))


# `user:password@` in a URL (of a repository, say): a secret wherever it is
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def without_url_credentials(text: str) -> str:
    """`text` with the credentials part of every URL in it replaced."""
    return _URL_CREDENTIALS.sub(f"{REDACTED}@", text)


def _map_secrets(value: Any, replace: Callable[[Any], Any]) -> Any:
    """A copy of JSON data with every non-null secret field's value replaced
    by `replace(value)`: the one walk over a config's secrets."""
    if isinstance(value, str):
        return without_url_credentials(value)
    if isinstance(value, dict):
        return {
            k: (
                replace(v)
                if (k in SECRET_FIELD_NAMES and v is not None)
                else _map_secrets(v, replace)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_map_secrets(v, replace) for v in value]
    return value


def redact_secrets(value: Any) -> Any:
    """A copy of JSON data with the value of every secret field replaced, for
    configs that leave the station in acknowledgements or land in logs."""
    return _map_secrets(value, lambda _: REDACTED)


# secrets shorter than this are not masked inside free text: a password "p"
# would star out every letter p of every line and reason; `ivy config check`
# warns about them, and they never leave in a config (SecretStr, redacted dumps)
MIN_MASKED_SECRET_LENGTH = 8


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret of at least `MIN_MASKED_SECRET_LENGTH`
    characters replaced by `REDACTED`, the longest first (so that a secret
    holding another is masked whole). The one masking rule of log lines,
    command output and the reasons in answers."""
    for secret in sorted(
        (s for s in set(secrets) if len(s) >= MIN_MASKED_SECRET_LENGTH), key=len, reverse=True
    ):
        text = text.replace(secret, REDACTED)
    return text


def secret_values(value: Any) -> set[str]:
    """Every secret value in JSON data (a config with its secrets revealed),
    for the logger's last line of defence."""
    found: set[str] = set()
    _map_secrets(value, lambda v: found.add(v) if isinstance(v, str) and v else None)
    return found


_MAX_PROBLEMS_SHOWN = 20


def format_validation_error(error: pydantic.ValidationError, source: str) -> str:
    """One line per problem: the dotted field path, what is wrong and the value
    found (redacted for secrets)."""
    lines = [f"{source} is invalid ({error.error_count()} problem(s)):"]
    problems = error.errors()
    for e in problems[:_MAX_PROBLEMS_SHOWN]:
        location = ".".join(str(part) for part in e["loc"]) or "(whole document)"
        line = f"  {location}: {e['msg']}"
        if e["type"] not in ("missing", "json_invalid"):
            if any(part in SECRET_FIELD_NAMES for part in e["loc"]):
                shown = REDACTED
            else:
                shown = without_url_credentials(json.dumps(e["input"], default=str))
                if len(shown) > 80:
                    shown = shown[:77] + "..."
            line += f" (got {shown})"
        lines.append(line)
    if len(problems) > _MAX_PROBLEMS_SHOWN:
        lines.append(f"  ... and {len(problems) - _MAX_PROBLEMS_SHOWN} more")
    return "\n".join(lines)
