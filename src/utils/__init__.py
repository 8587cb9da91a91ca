"""Building blocks used by the main loop, the procedures and the backends.

The reference API's classes are here by name (`src.utils.Logger`,
`src.utils.MessagingAgent`, ...), as are the modules (`src.utils.functions`),
all imported on first use (PEP 562): a procedure that logs never imports the
updater."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .lazy_exports import lazy_attribute

if TYPE_CHECKING:
    from .lifecycle_manager import LifecycleManager
    from .logger import Logger
    from .mainloop_toggle import MainloopToggle
    from .messaging_agent import MessagingAgent
    from .state_interface import StateInterface
    from .updater import Updater

_EXPORTS = {
    "LifecycleManager": "lifecycle_manager",
    "Logger": "logger",
    "MainloopToggle": "mainloop_toggle",
    "MessagingAgent": "messaging_agent",
    "StateInterface": "state_interface",
    "Updater": "updater",
}

__all__ = [
    "LifecycleManager",
    "Logger",
    "MainloopToggle",
    "MessagingAgent",
    "StateInterface",
    "Updater",
]


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)
