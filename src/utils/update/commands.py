"""Run one external command of an update step (git, pdm, uv, pytest) with a
timeout, as an argument list (never through a shell), and turn a failure into a
`StepError` whose message is the tail of the command's output with every
secret masked. The command dies with the process that started it, so a
`kill -9` of the main loop (and of its update worker) leaves nothing running.
Called by the updater's worker process and by `ivy setup`."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable, Mapping, Sequence

from src.types.config import mask_secrets

from ..parent_death import preexec_die_with_this_process

OUTPUT_TAIL_CHARACTERS = 2_000


class StepError(Exception):
    """An update step failed; the message says why, secrets masked."""


def output_tail(text: str, secrets: Iterable[str] = ()) -> str:
    """The last `OUTPUT_TAIL_CHARACTERS` of a command's output, secrets masked
    (masked before cutting, so that no half of a secret survives)."""
    masked = mask_secrets(text, secrets).strip()
    if len(masked) <= OUTPUT_TAIL_CHARACTERS:
        return masked
    return "[…] " + masked[-OUTPUT_TAIL_CHARACTERS:]


def run_command(
    arguments: Sequence[str],
    *,
    timeout: float,
    cwd: str | None = None,
    environment: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
) -> str:
    """Run `arguments` and return its output (stdout and stderr together).
    Raise `StepError` when it exits non-zero, cannot start, or runs longer
    than `timeout` seconds (then its whole process group is killed)."""
    secrets = tuple(secrets)
    try:
        process = subprocess.Popen(
            list(arguments),
            cwd=cwd,
            env=dict(environment) if environment is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=preexec_die_with_this_process(),
        )
    except OSError as e:
        raise StepError(f"{os.path.basename(arguments[0])} cannot start: {e}") from None
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        output, _ = process.communicate()
        raise StepError(
            f"{os.path.basename(arguments[0])} took longer than {timeout:.0f} s:\n"
            + output_tail(output or "", secrets)
        ) from None
    if process.returncode != 0:
        raise StepError(
            f"{os.path.basename(arguments[0])} exited with code {process.returncode}:\n"
            + output_tail(output or "", secrets)
        )
    return output or ""
