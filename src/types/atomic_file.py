"""Atomic file replacement, shared by the config and the state file."""

import os
import tempfile


def write_atomically(path: str, content: str, mode: int = 0o600) -> None:
    """Replace `path` with `content` so that readers see the old or the new file,
    never a partial one, even across a power loss (temporary file in the same
    directory, fsync, rename, fsync of the directory). Called by any process that
    writes the config or the state, and by the updater for the CLI pointer
    (`mode` 0o755)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fchmod(f.fileno(), mode)  # before the rename: never visible with another mode
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
