"""Paths, version and fixed numbers of this Ivy installation.

The `.env` files are loaded here, before any path is computed, so that
`IVY_ROOT_DIR` and `IVY_DATA_DIR` can come from them. Variables that are already
set in the environment win over both files; `config/.env` wins over `../.env`.
Nothing in this module imports from the rest of `src`.
"""

import os
import re

import dotenv
import tum_esm_utils.files
import tum_esm_utils.validators

PROJECT_DIR: str = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# load_dotenv never overrides a variable that is already set, so the file
# loaded first wins: config/.env before ../.env.
for _env_path in (
    os.path.join(PROJECT_DIR, "config", ".env"),
    os.path.join(os.path.dirname(PROJECT_DIR), ".env"),
):
    if os.path.isfile(_env_path):
        dotenv.load_dotenv(_env_path, override=False)

NAME: str = "ivy"

VERSION: tum_esm_utils.validators.Version = tum_esm_utils.validators.Version(
    tum_esm_utils.files.load_toml_file(os.path.join(PROJECT_DIR, "pyproject.toml"))["project"][
        "version"
    ]
)

DEFAULT_ROOT_DIR: str = os.path.join(os.path.expanduser("~"), "Documents", NAME)
ROOT_DIR: str = os.path.abspath(
    os.path.expanduser(os.environ.get("IVY_ROOT_DIR", "") or DEFAULT_ROOT_DIR)
)

# the name of a version directory `<root>/<version>/` (what `Version` accepts)
VERSION_PATTERN = re.compile(r"^\d+\.\d+\.\d+(-(alpha|beta|rc)\.\d+)?$")


def is_version_directory(path: str, root: str | None = None) -> bool:
    """Whether `path` is `<root>/<version>` (the production root by default):
    the one test of where a version lives, used for the data directory's
    default, the updater and the removal of old versions."""
    root = ROOT_DIR if root is None else root
    return os.path.dirname(os.path.abspath(path)) == root and bool(
        VERSION_PATTERN.match(os.path.basename(os.path.abspath(path)))
    )


def _default_data_dir() -> str:
    """`<root>/data` when this project is a version directory under the root (so
    that the queue survives upgrades), else `<project>/data`."""
    return os.path.join(ROOT_DIR if is_version_directory(PROJECT_DIR) else PROJECT_DIR, "data")


DATA_DIR: str = os.path.abspath(
    os.path.expanduser(os.environ.get("IVY_DATA_DIR", "") or _default_data_dir())
)

CONFIG_DIR: str = os.path.join(PROJECT_DIR, "config")
CONFIG_PATH: str = os.path.join(CONFIG_DIR, "config.json")
CONFIG_TEMPLATE_PATH: str = os.path.join(CONFIG_DIR, "config.template.json")

STATE_PATH: str = os.path.join(DATA_DIR, "state.json")
STATE_LOCK_PATH: str = os.path.join(DATA_DIR, "state.lock")
MESSAGE_QUEUE_PATH: str = os.path.join(DATA_DIR, "active-message-queue.sqlite3")
MESSAGE_ARCHIVE_DIR: str = os.path.join(DATA_DIR, "messages")
LOGS_DIR: str = os.path.join(DATA_DIR, "logs")
# held by the main loop and inherited by every child it forks: while any
# process of this installation lives, the lock is taken
MAINLOOP_LOCK_PATH: str = os.path.join(DATA_DIR, "ivy.lock")
MAINLOOP_OUTPUT_PATH: str = os.path.join(LOGS_DIR, "mainloop-output.txt")

LOGGING_LEVEL_PRIORITIES: dict[str, int] = {
    "DEBUG": 0,
    "INFO": 1,
    "WARNING": 2,
    "ERROR": 3,
    "EXCEPTION": 4,
}

SECONDS_PER_GRACEFUL_PROCEDURE_TEARDOWN: int = 10
