"""Logging to three channels, each with its own minimum level or off:
the console (stdout, which systemd's journal captures), the daily log file
`logs/YYYY-MM-DD.log`, and the message queue (so the backend sees warnings).

Every secret of the config is replaced before a line leaves the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Literal

from src import constants
from src.types import Config, LoggingVerbosityConfig, LogLevel, LogMessageBody
from src.types.config import mask_secrets, secret_values

from .functions import current_log_file_path, log_level_is_visible
from .messaging_agent import MessagingAgent

# Ivy 1.1's module variable: where the daily log files are (`<data>/logs`)
LOGS_ARCHIVE_DIR: str = constants.LOGS_DIR


class Logger:
    """A logger for one origin (a procedure's name, "main", "backend", ...)."""

    def __init__(self, config: Config | None, origin: str) -> None:
        """Create a logger for `origin`. Without a config (before one could be
        loaded) it uses the default levels and does not send messages. Called
        once per process."""
        self.origin = origin
        self.config = config
        self.verbosity = config.logging_verbosity if config else LoggingVerbosityConfig()
        revealed = json.loads(config.to_json(reveal_secrets=True)) if config else {}
        self.secrets = secret_values(revealed)
        # one queue connection per thread: paho's network thread logs too, and
        # a SQLite connection may only be used by the thread that opened it
        self._per_thread = threading.local()

    def debug(self, message: str, details: str | None = None) -> None:
        """Log at DEBUG level; `details` go on indented lines below."""
        self._log("DEBUG", message, details or "")

    def info(self, message: str, details: str | None = None) -> None:
        """Log at INFO level."""
        self._log("INFO", message, details or "")

    def warning(self, message: str, details: str | None = None) -> None:
        """Log at WARNING level."""
        self._log("WARNING", message, details or "")

    def error(self, message: str, details: str | None = None) -> None:
        """Log at ERROR level."""
        self._log("ERROR", message, details or "")

    def horizontal_line(self, fill_char: Literal["-", "=", ".", "_"] = "-") -> None:
        """Write a separator line (INFO) to the console and the log file."""
        self._log("INFO", fill_char * 64, "")

    @staticmethod
    def read_current_log_file() -> str | None:
        """Today's log file (UTC), or None when there is none yet. Called by
        `ivy logs` and tests."""
        try:
            with open(current_log_file_path(), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def exception(
        self, e: BaseException, label: str | None = None, details: str | None = None
    ) -> None:
        """Log an exception with its traceback at EXCEPTION level; `label` says
        what was being done."""
        subject = f"{label}: {type(e).__name__}: {e}" if label else f"{type(e).__name__}: {e}"
        trace = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        self._log("EXCEPTION", subject, f"{details}\n{trace}" if details else trace)

    def close(self) -> None:
        """Close the queue connection this logger opened in the calling
        thread, if any. Called when the main loop replaces its logger after a
        reconfiguration."""
        agent: MessagingAgent | None = getattr(self._per_thread, "agent", None)
        if agent is not None:
            agent.close()
            self._per_thread.agent = None

    def _redact(self, text: str) -> str:
        return mask_secrets(text, self.secrets)

    def _log(self, level: LogLevel, message: str, details: str) -> None:
        message, details = self._redact(message), self._redact(details)
        now = time.time()
        timestamp = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}"
        )
        text = f"{timestamp} UTC - {self.origin} - {level} - {message}\n"
        if details:
            text += "".join(f"    {line}\n" for line in details.strip("\n").splitlines())

        if log_level_is_visible(self.verbosity.console_prints, level):
            sys.stdout.write(text)
            sys.stdout.flush()
        if log_level_is_visible(self.verbosity.file_archive, level):
            self._write_to_file(now, text)
        if self.config is not None and log_level_is_visible(self.verbosity.message_sending, level):
            self._send(level, message, details)

    def _write_to_file(self, now: float, text: str) -> None:
        # logging never raises: a full disk once made the main loop's error
        # handler raise, which ended the main loop and left its children
        # unsupervised (found by the chaos harness)
        try:
            os.makedirs(constants.LOGS_DIR, exist_ok=True)
            # one write() on an O_APPEND descriptor: lines of concurrent
            # processes never interleave
            path = current_log_file_path(now)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"log file not writable ({e}): {text}")
                sys.stderr.flush()

    def _send(self, level: LogLevel, message: str, details: str) -> None:
        if getattr(self._per_thread, "sending", False):  # a failure must not recurse
            return
        self._per_thread.sending = True
        try:
            agent: MessagingAgent | None = getattr(self._per_thread, "agent", None)
            if agent is None:
                agent = self._per_thread.agent = MessagingAgent(self.config)
            agent.add_message(
                LogMessageBody(
                    level=level,
                    subject=f"{self.origin} - {message}"[:512],
                    body=details[:65_536],
                )
            )
        except Exception as e:
            self._write_to_file(time.time(), f"{self.origin} - could not queue log message: {e}\n")
        finally:
            self._per_thread.sending = False
