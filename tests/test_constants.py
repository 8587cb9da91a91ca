"""Paths from the environment: .env precedence and the data directory rule."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from tests.conftest import Station

pytestmark = pytest.mark.quick


def info(station: Station, **env: str | None) -> dict[str, str]:
    for key, value in env.items():
        if value is None:
            station.env.pop(key, None)
        else:
            station.env[key] = value
    result = station.cli("info")
    assert result.returncode == 0, result.stderr
    return {k: v.strip() for k, v in (line.split(":", 1) for line in result.stdout.splitlines())}


def test_config_env_wins_over_parent_env_and_real_env_over_both(
    station: Station, tmp_path: Any
) -> None:
    parent_env = os.path.join(os.path.dirname(station.project_dir), ".env")
    project_env = os.path.join(station.project_dir, "config", ".env")
    with open(parent_env, "w") as f:
        f.write(f"IVY_DATA_DIR={tmp_path / 'from-parent'}\n")
    assert info(station, IVY_DATA_DIR=None)["data directory"] == str(tmp_path / "from-parent")
    with open(project_env, "w") as f:
        f.write(f"IVY_DATA_DIR={tmp_path / 'from-config'}\n")
    assert info(station)["data directory"] == str(tmp_path / "from-config")
    assert info(station, IVY_DATA_DIR=str(tmp_path / "real"))["data directory"] == str(
        tmp_path / "real"
    )


def test_a_version_directory_keeps_its_data_under_the_root(station: Station, tmp_path: Any) -> None:
    root = tmp_path / "root"
    version_dir = root / "0.1.0"
    shutil.copytree(station.project_dir, version_dir)
    station.project_dir = str(version_dir)
    paths = info(station, IVY_DATA_DIR=None, IVY_ROOT_DIR=str(root))
    assert paths["data directory"] == str(root / "data")
    # a project that is not a version directory keeps its data beside it
    station.project_dir = str(tmp_path / "project")
    assert info(station, IVY_ROOT_DIR=str(root))["data directory"] == str(
        tmp_path / "project" / "data"
    )
