"""Typed records shared by every process: config, messages, state."""

from .config import (
    BackendConfig,
    Config,
    ConfigError,
    DummyProcedureConfig,
    ForeignConfig,
    ForeignGeneralConfig,
    LoggingVerbosityConfig,
    LogLevel,
    MQTTBrokerConfig,
    StorageConfig,
    SystemChecksConfig,
    TLSConfig,
    UpdaterConfig,
    redact_secrets,
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
    "DummyProcedureConfig",
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
    "SystemChecksConfig",
    "SystemState",
    "TLSConfig",
    "UpdaterConfig",
    "redact_secrets",
]
