"""The update's building blocks on their own: commands with timeouts and
masked output, the exact install from a lock, the disk check, the worker's
outcomes, and `ivy setup`'s refusals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest
from tum_esm_utils.validators import Version

from benchmarks.signing import make_signer, trust_station
from src import constants
from src.types import Config, ForeignConfig
from src.types.state import PendingConfig
from src.utils.state_interface import StateInterface
from src.utils.update import dependencies as dependency_install
from src.utils.update import steps
from src.utils.update.commands import OUTPUT_TAIL_CHARACTERS, StepError, output_tail, run_command
from src.utils.update.worker import UpdateJob, UpdateOutcome
from tests.conftest import PROJECT_DIR, template_config_dict, wait_until

pytestmark = pytest.mark.updater


@pytest.mark.quick
def test_a_failing_command_reports_the_tail_of_its_output_with_secrets_masked() -> None:
    script = "import sys; print('x' * 5000); print('token=hunter2-secret'); sys.exit(3)"
    with pytest.raises(StepError) as failed:
        run_command([sys.executable, "-c", script], timeout=30, secrets=["hunter2-secret"])
    message = str(failed.value)
    assert message.startswith("python")
    assert "exited with code 3" in message
    assert "token=***" in message and "hunter2" not in message
    assert len(message) < OUTPUT_TAIL_CHARACTERS + 100
    # one masking rule everywhere: long secrets go, longest first; a secret
    # too short to mask (`ivy config check` warns) does not garble every word
    assert output_tail("a-secret-value-c", ["secret-value", "secret"]) == "a-**********-c"
    assert output_tail("Input should be a valid integer", ["p"]) == (
        "Input should be a valid integer"
    )


@pytest.mark.quick
def test_a_command_past_its_timeout_is_killed_with_its_children() -> None:
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    started = time.time()
    with pytest.raises(StepError, match="took longer than 1 s") as failed:
        run_command([sys.executable, "-c", script], timeout=1)
    assert time.time() - started < 20
    grandchild = int(re.findall(r"\d+", str(failed.value).split(":", 1)[1])[0])
    assert wait_until(lambda: not psutil.pid_exists(grandchild), timeout=10)


@pytest.mark.quick
def test_a_missing_program_is_a_clear_error() -> None:
    with pytest.raises(StepError, match="no-such-program-xyz cannot start"):
        run_command(["/nonexistent/no-such-program-xyz"], timeout=5)


@pytest.mark.quick
def test_the_tool_pins_match_ci_setup() -> None:
    with open(os.path.join(PROJECT_DIR, ".ci", "setup")) as f:
        setup = f.read()
    for requirement in dependency_install.TOOL_REQUIREMENTS:
        assert f'"{requirement}"' in setup, requirement


@pytest.mark.quick
def test_not_enough_disk_space_is_refused_with_the_figures(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "ROOT_DIR", str(tmp_path))
    steps.check_free_space(Version("9.9.9"))  # this disk has room
    monkeypatch.setattr(steps, "DISK_MARGIN_BYTES", 2**62)
    with pytest.raises(StepError, match=r"not enough disk space for version 9\.9\.9: \d+ MiB free"):
        steps.check_free_space(Version("9.9.9"))


@pytest.fixture
def dev_tools(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """PDM and uv from the dev checkout, uv's cache in this test's directory."""
    monkeypatch.setenv("IVY_TOOLS_DIR", os.path.join(PROJECT_DIR, ".pdm-venv"))
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.integration
@pytest.mark.usefixtures("dev_tools")
def test_the_install_is_exactly_the_lock_and_shares_the_package_cache(tmp_path: Any) -> None:
    venvs = []
    for name in ("a", "b"):
        project = tmp_path / name
        project.mkdir()
        for file in ("pyproject.toml", "pdm.lock"):
            (project / file).write_bytes(open(os.path.join(PROJECT_DIR, file), "rb").read())
        dependency_install.install_locked_dependencies(str(project), print, timeout=600)
        venvs.append(project / ".venv")
    freeze = subprocess.run(
        [str(venvs[0] / "bin" / "python"), "-m", "pip", "--version"],
        capture_output=True,
        check=False,
    )
    assert freeze.returncode != 0  # no pip: nothing that is not in the lock
    listed = subprocess.run(
        [str(venvs[0] / "bin" / "python"), "-c", "import pydantic, paho.mqtt, pytest; print(1)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout == "1\n"
    with open(tmp_path / "a" / dependency_install.REQUIREMENTS_FILE) as f:
        requirements = f.read()
    assert "--hash=sha256:" in requirements and "mypy" not in requirements
    # the second venv's package files are hardlinks into the shared cache
    site = next((venvs[1] / "lib").glob("python*/site-packages/pydantic/main.py"))
    assert os.stat(site).st_nlink >= 2


@pytest.mark.integration
def test_the_worker_outcome_when_it_finishes_or_dies(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config.model_validate(template_config_dict())
    raw = template_config_dict()
    raw["general"]["software_version"] = "9.9.9"
    raw["updater"] = {"source": "git", "repository": str(tmp_path / "missing")}
    monkeypatch.setattr(constants, "ROOT_DIR", str(tmp_path / "root"))
    signer = make_signer(str(tmp_path / "keys"))
    trust_station(str(tmp_path / "root"), [signer], [signer], release_source=raw["updater"])
    pending = PendingConfig(config=ForeignConfig.model_validate(raw), origin="local")
    job = UpdateJob.start(config, pending)
    outcomes: list[UpdateOutcome] = []

    def ended() -> bool:
        outcomes.append(job.outcome())
        return outcomes[-1].finished

    assert wait_until(ended, timeout=120)
    failure = outcomes[-1].failure
    assert failure is not None and failure.startswith("download: git fetch of tag v9.9.9 failed")
    assert StateInterface.load().update_in_progress is None

    dying = UpdateJob.start(config, pending)
    assert dying.process.pid is not None
    os.kill(dying.process.pid, 9)
    dying.process.join(10)
    assert dying.outcome() == UpdateOutcome(True, "the update worker died (exit code -9)")


@pytest.mark.integration
def test_setup_refuses_bad_input_with_a_clear_message(tmp_path: Any) -> None:
    def setup(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                os.path.join(PROJECT_DIR, "cli.py"),
                "setup",
                "--root",
                str(tmp_path / "root"),
                "--source",
                "git",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    bad_version = setup("--repository", "/x", "--version", "1.2")
    assert bad_version.returncode == 1
    assert "--version: '1.2' is not a plain version" in bad_version.stderr
    unsigned = setup("--repository", "/x", "--version", "1.2.3")
    assert unsigned.returncode == 1
    assert "--config-signers FILE is required" in unsigned.stderr
    assert "--accept-unsigned-configs is the explicit opt-out" in unsigned.stderr
    key = make_signer(str(tmp_path / "keys"))
    signers = ["--config-signers", key.public, "--release-signers", key.public]
    not_a_key = setup(
        "--repository",
        "/x",
        "--version",
        "1.2.3",
        *signers[:2],
        "--release-signers",
        "/etc/hostname",
    )
    assert not_a_key.returncode == 1 and "neither an OpenSSH public key" in not_a_key.stderr
    plain_http = setup("--repository", "http://example.org/x.git", "--version", "1.2.3", *signers)
    assert plain_http.returncode == 1 and "an unencrypted URL is refused" in plain_http.stderr
    missing = setup("--repository", str(tmp_path / "nothing"), "--version", "1.2.3", *signers)
    assert missing.returncode == 1
    assert "setup failed: git fetch of tag v1.2.3 failed" in missing.stderr
    outputs = [r.stderr for r in (bad_version, unsigned, not_a_key, plain_http, missing)]
    assert all("Traceback" not in output for output in outputs)


@pytest.mark.integration
@pytest.mark.usefixtures("dev_tools")
def test_a_lock_that_cannot_be_installed_fails_the_install_step_with_its_reason(
    tmp_path: Any,
) -> None:
    project = tmp_path / "broken"
    project.mkdir()
    (project / "pyproject.toml").write_bytes(
        open(os.path.join(PROJECT_DIR, "pyproject.toml"), "rb").read()
    )
    lock = open(os.path.join(PROJECT_DIR, "pdm.lock")).read()
    # a tampered wheel hash: uv must refuse what the lock does not vouch for
    tampered = re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, lock)
    (project / "pdm.lock").write_text(tampered)
    with pytest.raises(StepError, match="uv exited with code"):
        dependency_install.install_locked_dependencies(str(project), print, timeout=600)
    with pytest.raises(StepError, match=r"has no pdm\.lock"):
        dependency_install.install_locked_dependencies(str(tmp_path), print, timeout=60)
