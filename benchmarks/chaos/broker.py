"""Mosquitto for the chaos harness: one listener for the station and one for
the recorder, so that a restart without persistence can let the recorder
subscribe again before the station may reconnect (otherwise the broker would
drop the station's first messages for want of a subscriber: the harness's
blind spot, not a loss of the station's)."""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable

from benchmarks.mosquitto import Broker, free_port


class ChaosBroker(Broker):
    """A persistent Mosquitto with a second listener for the recorder."""

    def __init__(self, directory: str) -> None:
        """Write the config (nothing runs yet)."""
        self.recorder_port = free_port()
        super().__init__(directory, extra_lines=(f"listener {self.recorder_port} 127.0.0.1",))
        with open(self.config_path) as f:
            self.full_config = f.read()

    def _write_config(self, with_station: bool) -> None:
        text = self.full_config
        if not with_station:
            text = text.replace(f"listener {self.port} 127.0.0.1\n", "")
        with open(self.config_path, "w") as f:
            f.write(text)

    def restart_without_persistence(self, recorder_resubscribed: Callable[[], bool]) -> None:
        """Stop, delete the persistence file (every session and queued message
        is gone), let only the recorder back in until `recorder_resubscribed`,
        then open the station's listener again. Called with the broker stopped
        or running."""
        self.stop()
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            os.remove(path)
        self._write_config(with_station=False)
        self.start_recorder_only()
        try:
            wait_for(recorder_resubscribed, 30, "the recorder to subscribe again")
        finally:
            self.stop()  # saves the recorder's new session
            self._write_config(with_station=True)
        self.start()

    def start_recorder_only(self) -> None:
        """Start with only the recorder's listener open."""
        port, self.port = self.port, self.recorder_port
        try:
            super().start()  # waits for the recorder's port
        finally:
            self.port = port


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 0.1 s; RuntimeError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout} s for {what}")
        time.sleep(0.1)
