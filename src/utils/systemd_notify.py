"""Tell systemd how the main loop (or the guard of a version trial) is doing,
through `NOTIFY_SOCKET` when it runs under systemd (`Type=notify`,
`WatchdogSec`): `READY=1` once it runs, `WATCHDOG=1` while it is alive. A
hung main loop stops sending, and systemd restarts it. No dependency: the
protocol is one datagram on a Unix socket. Called by the main loop and the
guard; does nothing outside systemd."""

from __future__ import annotations

import os
import socket
import time

_last_watchdog = 0.0


def notify(message: str) -> None:
    """Send one notification (`READY=1`, `WATCHDOG=1`, `STATUS=...`)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in ("/", "@"):
        return
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError:
        pass  # systemd went away; nothing to tell


def watchdog(min_interval: float = 5.0) -> None:
    """`WATCHDOG=1`, at most once per `min_interval` seconds."""
    global _last_watchdog
    now = time.monotonic()
    if now - _last_watchdog >= min_interval:
        _last_watchdog = now
        notify("WATCHDOG=1")
