"""The updater's decisions on pending configs, in the process: configs for the
running version applied atomically and acknowledged; invalid, stale and
version-changing ones rejected or ignored, nothing written; the trust policy's
limits on remote configs. The main loop asks the same `UpdateCoordinator`."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Literal

import pytest
from tum_esm_utils.validators import Version

from benchmarks.signing import make_signer, trust_station
from src import constants
from src.procedures.dummy_procedure import DummyProcedureConfig
from src.types import Config, ForeignConfig, State
from src.types.state import PendingConfig
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from src.utils.update import config_trial
from src.utils.update.admission import config_revision_is_new, queue_pending_config
from src.utils.update.coordinator import RestartWith, UpdateCoordinator
from src.utils.update.paths import cli_pointer_path, previous_config_path
from src.utils.updater import Updater
from tests.conftest import template_config_dict

pytestmark = [pytest.mark.quick, pytest.mark.updater]

GIT_SOURCE = {"source": "git", "repository": "/nonexistent/repo"}


@pytest.fixture
def root(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A root of this test's own, with a trust policy pinning GIT_SOURCE."""
    directory = str(tmp_path / "root")
    monkeypatch.setattr(constants, "ROOT_DIR", directory)
    signer = make_signer(str(tmp_path / "keys"))
    trust_station(directory, [signer], [signer], release_source=GIT_SOURCE, broker_hosts=["mqtt"])
    return directory


def make_coordinator() -> tuple[UpdateCoordinator, MessagingAgent]:
    config = Config.model_validate(template_config_dict())
    config.dump()
    agent = MessagingAgent(config)
    return UpdateCoordinator(config, Logger(config, "updater-test"), agent), agent


def foreign(revision: int, **changes: Any) -> ForeignConfig:
    config = template_config_dict()
    config["general"]["config_revision"] = revision
    for key, value in changes.items():
        config[key] = value
    return ForeignConfig.model_validate(config)


def local(config: ForeignConfig) -> PendingConfig:
    return PendingConfig(config=config, origin="local", digest="d" * 64)


def judge(
    coordinator: UpdateCoordinator,
    config: ForeignConfig,
    origin: Literal["local", "remote"] = "local",
) -> Any:
    """Queue a config as `ivy config apply` (or a backend) does and let the
    updater take it, as the main loop does each turn."""
    pending = PendingConfig(config=config, origin=origin, digest="d" * 64)
    queue_pending_config(pending)
    coordinator.state_seen = None
    return coordinator.next_action()


def acknowledgements(agent: MessagingAgent) -> list[dict[str, Any]]:
    return [
        m.body.model_dump() for m in agent.get_n_latest_messages(100) if m.body.variant == "config"
    ]


def config_file() -> str:
    with open(constants.CONFIG_PATH) as f:
        return f.read()


def test_same_version_config_is_written_and_acknowledged() -> None:
    coordinator, agent = make_coordinator()
    new = judge(
        coordinator,
        foreign(
            5,
            dummy_procedure={"seconds_between_datapoints": 3},
            backend={
                "provider": "thingsboard",
                "mqtt_host": "localhost",
                "mqtt_client_id": "c",
                "mqtt_password": "pw-secret-1",
            },
        ),
    )
    assert isinstance(new, RestartWith) and new.config.general.config_revision == 5
    on_disk = Config.load()
    section = on_disk.procedure_section("dummy_procedure", DummyProcedureConfig)
    assert section is not None and section.seconds_between_datapoints == 3
    assert [a["status"] for a in acknowledgements(agent)] == ["received"]  # on trial
    assert os.path.isfile(previous_config_path())
    config_trial.accept(local(new.config.to_foreign_config()), coordinator.answers)
    assert not os.path.exists(previous_config_path())
    acks = acknowledgements(agent)
    assert [a["status"] for a in acks] == ["received", "accepted"]
    assert "pw-secret-1" not in json.dumps(acks)
    assert acks[1]["config"]["backend"]["mqtt_password"] == "**********"


def test_invalid_config_is_rejected_naming_the_field_and_nothing_written() -> None:
    coordinator, agent = make_coordinator()
    before = config_file()
    assert judge(coordinator, foreign(2, dummy_procedure={"seconds_between_datapoints": 0})) is None
    assert config_file() == before
    rejected = acknowledgements(agent)[-1]
    assert rejected["status"] == "rejected"
    assert "dummy_procedure.seconds_between_datapoints" in rejected["reason"]
    assert "(got 0)" in rejected["reason"]
    assert rejected["config"] == {} and rejected["digest"] == "d" * 64  # never the config


def test_stale_and_duplicate_revisions_are_ignored() -> None:
    coordinator, agent = make_coordinator()
    assert judge(coordinator, foreign(3)) is not None
    assert judge(coordinator, foreign(3)) is None  # a replay
    assert judge(coordinator, foreign(1)) is None  # older
    assert [a["status"] for a in acknowledgements(agent)] == ["received"]


def version_change(revision: int, version: str, updater: Any) -> ForeignConfig:
    config = foreign(revision, updater=updater)
    config.general.software_version.root = version
    return config


@pytest.mark.parametrize(
    ("version", "updater_section", "reason"),
    [
        (
            "9.9.9",
            {"source": "git", "repository": "/elsewhere"},
            "updater: names a release source other than the one this station's trust policy pins",
        ),
        ("0.0.1", GIT_SOURCE, "general.software_version: 0.0.1 is older than the running"),
    ],
)
@pytest.mark.usefixtures("root")
def test_a_version_change_that_cannot_be_installed_is_refused_and_changes_nothing(
    version: str, updater_section: Any, reason: str
) -> None:
    coordinator, agent = make_coordinator()
    before = config_file()
    assert judge(coordinator, version_change(4, version, updater_section)) is None
    assert coordinator.job is None and config_file() == before
    acks = acknowledgements(agent)
    assert [a["status"] for a in acks] == ["received", "rejected"]
    assert acks[0]["software_update"] == "DOWNLOADING"
    assert acks[1]["software_update"] == "FAILED"
    assert reason in acks[1]["reason"], acks[1]["reason"]
    assert StateInterface.load().rejected_config_revisions == [4]
    assert StateInterface.load().config_outcomes[-1].status == "rejected"


def test_without_a_pinned_release_source_no_version_change_is_taken(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "ROOT_DIR", str(tmp_path / "no-policy"))
    coordinator, agent = make_coordinator()
    assert judge(coordinator, version_change(4, "9.9.9", None)) is None
    assert "pins no release source" in acknowledgements(agent)[-1]["reason"]


@pytest.mark.usefixtures("root")
def test_a_downgrade_needs_the_config_to_ask_and_a_remote_one_the_policy_too() -> None:
    coordinator, _ = make_coordinator()
    allowed = {**GIT_SOURCE, "allow_downgrades": True}
    assert coordinator.version_change_problem(local(version_change(4, "0.0.1", allowed))) is None
    assert coordinator.version_change_problem(local(version_change(5, "9.9.9", None))) is None
    remote = PendingConfig(config=version_change(6, "0.0.1", allowed), origin="remote")
    problem = coordinator.version_change_problem(remote)
    assert problem is not None and "a trust policy that allows downgrades" in problem
    # none is handled yet: the worker has not run
    assert StateInterface.load().highest_handled_config_revision is None


@pytest.mark.usefixtures("root")
def test_a_remote_config_cannot_move_the_broker_or_the_release_source() -> None:
    coordinator, agent = make_coordinator()
    backend = {"provider": "thingsboard", "mqtt_client_id": "c"}
    cases = [
        (foreign(7, backend={**backend, "mqtt_host": "evil.example.org"}), "not a broker host"),
        (foreign(8, updater={"source": "git", "repository": "/attacker"}), "updater: names a"),
    ]
    for config, reason in cases:
        assert judge(coordinator, config, origin="remote") is None
        assert reason in acknowledgements(agent)[-1]["reason"]
    assert isinstance(
        judge(coordinator, foreign(9, backend={**backend, "mqtt_host": "mqtt"}), "remote"),
        RestartWith,
    )


def test_a_remote_config_cannot_shed_tls_by_renaming_a_destination_or_failing_over(
    root: str,
) -> None:
    coordinator, agent = make_coordinator()
    with_tls = {
        "provider": "thingsboard",
        "mqtt_host": "mqtt",
        "mqtt_client_id": "c",
        "tls": {"ca_file": None},
    }
    assert isinstance(judge(coordinator, foreign(7, backend=with_tls), "remote"), RestartWith)
    config_trial.accept(local(Config.load().to_foreign_config()), coordinator.answers)
    # the main loop restarts with the accepted config
    coordinator = UpdateCoordinator(Config.load(), Logger(Config.load(), "updater-test"), agent)
    plain = {k: v for k, v in with_tls.items() if k != "tls"}
    cases = [
        foreign(8, backends={"renamed": plain}),
        foreign(
            9,
            backend={**with_tls, "failover": [{"mqtt_host": "mqtt"}]},
            backends={
                "other": {**plain, "mqtt_host": "mqtt"},
            },
        ),
    ]
    for config in cases:
        assert judge(coordinator, config, origin="remote") is None
        assert "uses TLS" in acknowledgements(agent)[-1]["reason"]
    assert Config.load().general.config_revision == 7


def test_a_fresh_station_accepts_its_current_revision_once() -> None:
    """Tenta numbers a sensor's first config 0, the template's revision: a
    station that has accepted no remote config takes it; a replay is ignored."""
    coordinator, agent = make_coordinator()
    assert judge(coordinator, foreign(0)) is not None
    assert judge(coordinator, foreign(0)) is None
    assert [a["status"] for a in acknowledgements(agent)] == ["received"]


def test_a_rejected_revision_blocks_only_itself() -> None:
    """The revision memory cannot be poisoned: a rejected config (even with the
    largest revision there is) is not judged again, and a later valid config
    with any newer revision is still accepted."""
    coordinator, agent = make_coordinator()
    highest = 2**31 - 1
    assert judge(coordinator, foreign(highest, dummy_procedure={"x": 1})) is None
    assert judge(coordinator, foreign(highest, dummy_procedure={"x": 1})) is None  # not again
    assert StateInterface.load().highest_handled_config_revision is None
    assert judge(coordinator, foreign(7)) is not None
    assert [a["status"] for a in acknowledgements(agent)] == ["received", "rejected", "received"]


def test_revision_rules() -> None:
    state = State()
    assert config_revision_is_new(0, 0, state)  # fresh: the current one too
    assert not config_revision_is_new(0, 1, state)  # older than the running config
    state.highest_handled_config_revision = 5
    assert not config_revision_is_new(5, 0, state) and config_revision_is_new(6, 0, state)
    state.rejected_config_revisions = [9]
    assert not config_revision_is_new(9, 0, state) and config_revision_is_new(10, 0, state)


def test_the_cli_pointer_runs_the_version_it_names(tmp_path: Any, monkeypatch: Any) -> None:
    root = tmp_path / "root with space"
    monkeypatch.setattr(constants, "ROOT_DIR", str(root))
    for version in ("1.0.0", "1.1.0"):
        python = root / version / ".venv" / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(f'#!/bin/sh\necho "{version}: $@"\n')
        python.chmod(0o755)
    Updater.update_cli_pointer(Version("1.0.0"))
    pointer = cli_pointer_path()
    assert os.access(pointer, os.X_OK)
    ran = subprocess.run([pointer, "status", "--json"], capture_output=True, text=True, check=True)
    assert ran.stdout == f"1.0.0: {root}/1.0.0/cli.py status --json\n"
    Updater.update_cli_pointer(Version("1.1.0"))
    ran = subprocess.run([pointer, "start"], capture_output=True, text=True, check=True)
    assert ran.stdout.startswith("1.1.0: ")
    assert sorted(os.listdir(root)) == ["1.0.0", "1.1.0", "ivy-cli.sh"]  # no temporary file


def test_old_venvs_are_removed_but_the_current_and_kept_ones(
    tmp_path: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(constants, "ROOT_DIR", str(tmp_path))
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        (tmp_path / version / ".venv").mkdir(parents=True)
    removed: list[str] = []
    Updater.remove_old_venvs(Version("1.2.0"), removed.append, keep=("1.1.0",))
    assert removed == ["removed the virtual environment of 1.0.0"]
    assert sorted(p.name for p in tmp_path.glob("*/.venv")) == [".venv", ".venv"]
    assert (tmp_path / "1.0.0").is_dir()  # the source stays; only its venv went


@pytest.mark.usefixtures("root")
def test_credentials_in_a_repository_url_are_refused_and_never_echoed() -> None:
    coordinator, agent = make_coordinator()
    source = {"source": "git", "repository": "https://station:tok3n-secret-9@git.example.org/x"}
    assert judge(coordinator, version_change(4, "9.9.9", source)) is None
    acks = json.dumps(acknowledgements(agent))
    assert "updater: names a release source other than" in acks
    assert "tok3n-secret-9" not in acks
    assert "tok3n-secret-9" not in json.dumps(StateInterface.load().model_dump())


def test_a_config_that_fails_its_trial_is_rejected_and_the_previous_one_is_back() -> None:
    coordinator, agent = make_coordinator()
    before = config_file()
    new = judge(coordinator, foreign(6, system_checks=None))
    assert isinstance(new, RestartWith) and config_file() != before
    previous = config_trial.reject(
        local(new.config.to_foreign_config()),
        "not healthy 30 s after the change: backend down",
        coordinator.answers,
    )
    assert previous.general.config_revision == 0 and config_file() == before
    acks = acknowledgements(agent)
    assert [a["status"] for a in acks] == ["received", "rejected"]
    assert acks[1]["reason"].startswith("the previous config is back: not healthy")
    state = StateInterface.load()
    assert state.highest_handled_config_revision == 6 and 6 in state.rejected_config_revisions
    assert not os.path.exists(previous_config_path())


@pytest.mark.usefixtures("root")
def test_a_checkout_outside_a_production_root_refuses_version_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its queue would stay behind in the checkout's data directory."""
    monkeypatch.delenv("IVY_DATA_DIR")
    coordinator, agent = make_coordinator()
    assert judge(coordinator, version_change(4, "9.9.9", GIT_SOURCE)) is None
    reason = acknowledgements(agent)[-1]["reason"]
    assert "is not a version directory under the root" in reason and "ivy setup" in reason
