"""Typed records shared by every process: config, messages, state."""

from .config import (
    BackendConfig,
    Config,
    ConfigError,
    ForeignConfig,
    ForeignGeneralConfig,
    LoggingVerbosityConfig,
    LogLevel,
    MQTTBrokerConfig,
    StorageConfig,
    TLSConfig,
    UpdaterConfig,
    redact_secrets,
    register_procedure_sections,
)
from .messages import (
    ConfigMessageBody,
    DataMessageBody,
    LogMessageBody,
    MessageArchiveItem,
    MessageBody,
    MessageQueueItem,
)
from .state import MainloopState, ProcessState, State, SystemState

__all__ = [
    "BackendConfig",
    "Config",
    "ConfigError",
    "ConfigMessageBody",
    "DataMessageBody",
    "ForeignConfig",
    "ForeignGeneralConfig",
    "LogLevel",
    "LogMessageBody",
    "LoggingVerbosityConfig",
    "MQTTBrokerConfig",
    "MainloopState",
    "MessageArchiveItem",
    "MessageBody",
    "MessageQueueItem",
    "ProcessState",
    "State",
    "StorageConfig",
    "SystemState",
    "TLSConfig",
    "UpdaterConfig",
    "redact_secrets",
    "register_procedure_sections",
]
