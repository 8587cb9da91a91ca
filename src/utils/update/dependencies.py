"""Create a version's `.venv` with exactly the packages its `pdm.lock` pins.

Measured side by side (README, "Remote updates"): `pdm sync` of the lock took
about 7 s, PDM with `use_uv` about 2 s, and uv installing the hashed
requirements that `pdm export` writes from the lock about 1 s plus 0.3 s for
the export, with a warm cache. The last one is used: the lock stays the source
of truth (PDM reads it), every wheel's hash is checked (`--require-hashes`),
`uv pip sync` removes anything not listed, and uv hardlinks files from a cache
shared by all versions under the root, so a second venv costs little disk.

Installed: the runtime dependencies plus the lock's `gate` group (pytest and
what the `version_change` tests import), because the updater runs those tests
in the new venv before it switches. Nothing of the `dev` group.

PDM and uv live in a tools venv of their own (`<root>/.tools`, or
`IVY_TOOLS_DIR`), created on first use with pinned versions.
Called by the updater's worker process and by `ivy setup`.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable

from src import constants

from .commands import StepError, run_command

# the same pins as .ci/setup (a test keeps them equal)
TOOL_REQUIREMENTS: tuple[str, ...] = (
    "pdm==2.26.6",
    "unearth==0.18.2",
    "hishel[httpx]>=1,<1.2",
    "uv==0.13.9",
)
GATE_GROUP = "gate"
REQUIREMENTS_FILE = ".locked-requirements.txt"
_TOOLS_TIMEOUT_SECONDS = 600


def tools_directory() -> str:
    """The venv that holds PDM and uv: `IVY_TOOLS_DIR` or `<root>/.tools`."""
    return os.environ.get("IVY_TOOLS_DIR") or os.path.join(constants.ROOT_DIR, ".tools")


def package_cache_directory() -> str:
    """uv's cache, shared by every version (`UV_CACHE_DIR` or
    `<root>/.cache/uv`); on the venvs' filesystem, so that uv can hardlink."""
    return os.environ.get("UV_CACHE_DIR") or os.path.join(constants.ROOT_DIR, ".cache", "uv")


def _tool_environment() -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        # the running version's own venv and paths must not leak into the new one
        if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    environment.update(
        {
            "PDM_CHECK_UPDATE": "false",
            "PDM_IGNORE_ACTIVE_VENV": "1",
            "UV_CACHE_DIR": package_cache_directory(),
            "UV_LINK_MODE": "hardlink",
            "UV_NO_PROGRESS": "1",
        }
    )
    return environment


def ensure_tools(log_progress: Callable[[str], None]) -> tuple[str, str]:
    """Return the paths of `pdm` and `uv`, creating the tools venv first if
    it lacks either."""
    directory = tools_directory()
    pdm, uv = (os.path.join(directory, "bin", name) for name in ("pdm", "uv"))
    if os.access(pdm, os.X_OK) and os.access(uv, os.X_OK):
        return pdm, uv
    log_progress(f"creating the tools venv {directory} (PDM and uv)")
    python = getattr(sys, "_base_executable", sys.executable)
    run_command([python, "-m", "venv", directory], timeout=_TOOLS_TIMEOUT_SECONDS)
    run_command(
        [
            os.path.join(directory, "bin", "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *TOOL_REQUIREMENTS,
        ],
        timeout=_TOOLS_TIMEOUT_SECONDS,
    )
    return pdm, uv


def install_locked_dependencies(
    project_directory: str, log_progress: Callable[[str], None], timeout: float
) -> None:
    """(Re)create `<project_directory>/.venv` with exactly the runtime and
    `gate` packages of its `pdm.lock`, hashes checked. Raise `StepError` with
    the tool's output when the lock cannot be exported or installed."""
    if not os.path.isfile(os.path.join(project_directory, "pdm.lock")):
        raise StepError(f"{project_directory} has no pdm.lock")
    pdm, uv = ensure_tools(log_progress)
    environment = _tool_environment()
    requirements = os.path.join(project_directory, REQUIREMENTS_FILE)
    venv = os.path.join(project_directory, ".venv")
    log_progress(f"exporting the locked runtime and {GATE_GROUP} dependencies")
    run_command(
        [
            pdm,
            "export",
            "--project",
            project_directory,
            "-G",
            GATE_GROUP,
            "--format",
            "requirements",
            "--output",
            requirements,
        ],
        timeout=timeout,
        cwd=project_directory,
        environment=environment,
    )
    shutil.rmtree(venv, ignore_errors=True)  # a venv half-built by a killed attempt
    log_progress(f"installing them into {venv}")
    python = getattr(sys, "_base_executable", sys.executable)
    run_command(
        [uv, "venv", "--quiet", "--python", python, venv],
        timeout=timeout,
        environment=environment,
    )
    run_command(
        [
            uv,
            "pip",
            "sync",
            "--quiet",
            "--require-hashes",
            "--python",
            os.path.join(venv, "bin", "python"),
            requirements,
        ],
        timeout=timeout,
        environment=environment,
    )
