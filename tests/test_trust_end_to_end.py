"""The attack of the trust review, end to end: a production root made by `ivy
setup` (signers, pinned source), its station running against a real
Mosquitto with the Tenta backend, and an attacker who can publish on its
config topic and owns a git repository with a release whose code writes a
marker file from every place a tool might run it (cli.py, conftest.py, run.py,
the main loop).

Refused, each with a reason at the broker, nothing of it run, and the station
measuring on: the anonymous retained config naming the attacker's repository;
the same config signed by the attacker's own key; the operator's own signed
config naming that repository (the policy pins the source); an unsigned
config with the largest revision there is. Then the operator's signed config
for a signed release is updated to and committed, as before."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from benchmarks.production import (
    BASE,
    GOOD,
    ProductionStation,
    Releases,
    git,
    set_version,
    sign_tag,
    station_config,
)
from benchmarks.signing import make_signer
from src.utils.update.signatures import envelope, sign_text, signed_document_text
from tests.conftest import wait_until
from tests.mqtt_helpers import Subscriber, publish
from tests.production_fixtures import set_up, start

pytestmark = [pytest.mark.integration, pytest.mark.updater]

SENSOR = "3f1c2b7a-9d4e-4c61-8a2b-5e7f9c0d1a24"
ATTACK_VERSION = "0.1.1" if BASE == "0.1.0" else f"{BASE}-rc.1"


def attacker_release(tmp_path: Any, releases: Releases, marker: str) -> str:
    """The project at BASE plus code that writes `marker`, tagged v<ATTACK>
    (signed with the attacker's own key, which no station trusts)."""
    repository = str(tmp_path / "attacker")
    subprocess.run(["git", "clone", "--quiet", releases.repository, repository], check=True)
    git("checkout", "--quiet", f"v{BASE}", cwd=repository)
    set_version(repository, BASE, ATTACK_VERSION)
    for name in ("cli.py", "run.py", "conftest.py", "src/main.py"):
        with open(os.path.join(repository, name), "a") as f:
            f.write(f"\nopen({marker!r}, 'a').write(__file__ + '\\n')\n")
    git("add", "-A", cwd=repository)
    git("commit", "--quiet", "-m", "helpful update", cwd=repository)
    attacker = make_signer(str(tmp_path / "attacker-keys"), "attacker")
    sign_tag(repository, f"v{ATTACK_VERSION}", attacker)
    return repository


def test_only_the_operator_can_change_the_station(
    tmp_path: Any,
    releases: Releases,
    package_cache: str,
    killer: list[ProductionStation],
    broker: Broker,
) -> None:
    backend = {
        "provider": "tenta",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": broker.port,
        "mqtt_client_id": "station-under-attack",
    }
    general = {"system_identifier": SENSOR, "config_revision": 0, "software_version": BASE}
    station = set_up(tmp_path, releases, package_cache, backend=backend, general=general)
    killer.append(station)
    subscriber = Subscriber(
        broker.port,
        [f"measurements/{SENSOR}", f"logs/{SENSOR}", f"acknowledgments/{SENSOR}"],
        client_id="tenta-server",
    )
    start(station)
    assert wait_until(lambda: len(subscriber.items("measurements/")) >= 2, timeout=60)

    marker = str(tmp_path / "MARKER-attacker-code-ran")
    attacker_repository = attacker_release(tmp_path, releases, marker)
    topic = f"configurations/{SENSOR}"

    def config(version: str, **changes: Any) -> dict[str, Any]:
        made = station_config(releases, version, 0)
        made.update(backend=backend, general={**general, "software_version": version}, **changes)
        return made

    def logs(text: str) -> list[str]:
        return [i["message"] for i in subscriber.items("logs/") if text in i["message"]]

    evil = config(ATTACK_VERSION, updater={"source": "git", "repository": attacker_repository})
    publish(broker.port, topic, {"revision": 5, "configuration": evil}, retain=True)
    assert wait_until(lambda: bool(logs("claiming revision 5 was not accepted")), timeout=60)
    assert "unsigned: this station takes only configs signed" in logs("claiming revision 5")[0]

    attacker_key = make_signer(str(tmp_path / "attacker-keys-2"), "attacker")
    signed_by_attacker = attacker_key.sign(evil)
    publish(broker.port, topic, {"revision": 6, "configuration": signed_by_attacker}, retain=True)
    assert wait_until(lambda: bool(logs("claiming revision 6 was not accepted")), timeout=60)
    assert "not made by a key this station trusts" in logs("claiming revision 6")[0]

    # even the operator's own key cannot send the station elsewhere for code
    operator_evil = releases.config_key.sign(evil)
    publish(broker.port, topic, {"revision": 7, "configuration": operator_evil}, retain=True)

    def acknowledged(revision: int) -> list[dict[str, Any]]:
        return [a for a in subscriber.items("acknowledgments/") if a["revision"] == revision]

    assert wait_until(lambda: bool(acknowledged(7)), timeout=60)
    assert acknowledged(7)[0]["success"] is False
    assert wait_until(lambda: bool(logs("names a release source other than")), timeout=30)

    # an unsigned config with the largest revision, once a lock-out
    locked = config(BASE)
    publish(broker.port, topic, {"revision": 2**31 - 1, "configuration": locked}, retain=True)
    assert wait_until(lambda: bool(logs(f"claiming revision {2**31 - 1} was not accepted")), 60)

    # the same attack as fleet changes (merge patches), which the station
    # merges into its running config: the attacker's key, the operator's own
    # key naming the attacker's repository, and an operator's patch whose
    # unsigned topic revision the attacker changed
    evil_patch = {
        "general": {"software_version": ATTACK_VERSION},
        "updater": {"source": "git", "repository": attacker_repository},
    }
    attacker_patch = attacker_key.sign_change(evil_patch, [SENSOR], "patch")
    publish(broker.port, topic, {"revision": 9, "configuration": attacker_patch}, retain=True)
    assert wait_until(lambda: bool(logs("claiming revision 9 was not accepted")), timeout=60)
    assert "not made by a key this station trusts" in logs("claiming revision 9")[0]
    operator_patch = releases.config_key.sign_change(evil_patch, [SENSOR], "patch")
    publish(broker.port, topic, {"revision": 10, "configuration": operator_patch}, retain=True)
    assert wait_until(lambda: bool(acknowledged(10)), timeout=60)
    assert acknowledged(10)[0]["success"] is False
    text = signed_document_text({"system_checks": None}, [SENSOR], kind="patch", revision=11)
    moved = envelope(text, sign_text(text, releases.config_key.private))
    publish(broker.port, topic, {"revision": 12, "configuration": moved}, retain=True)
    assert wait_until(lambda: bool(logs("the signed change says 11")), timeout=60)

    assert not os.path.exists(marker)
    assert not os.path.exists(os.path.join(station.root, ATTACK_VERSION))
    assert acknowledged(5) == acknowledged(6) == acknowledged(2**31 - 1) == []
    assert acknowledged(9) == acknowledged(11) == acknowledged(12) == []
    measured = len(subscriber.items("measurements/"))
    assert wait_until(lambda: len(subscriber.items("measurements/")) >= measured + 2, 60)
    assert station.running_versions() == {BASE}

    # the operator's next config, signed, for a signed release: updated, committed
    good = config(GOOD, trial={"deadline_seconds": 60, "stable_seconds": 1, "max_starts": 3})
    publish(
        broker.port, topic, {"revision": 8, "configuration": releases.config_key.sign(good)}, True
    )
    assert wait_until(lambda: bool(acknowledged(8)), timeout=300, interval=0.5), logs("revision 8")
    assert acknowledged(8)[0]["success"] is True
    assert station.pointed_version() == GOOD
    assert wait_until(lambda: station.running_versions() == {GOOD}, timeout=30)
    journal = json.loads(open(os.path.join(station.root, "data", "update-journal.json")).read())
    assert journal["current"] == GOOD and journal["previous"] == BASE
    assert not os.path.exists(marker)
    status = station.cli("status")
    assert "trust:   configs: only those signed by a key in" in status.stdout
    assert station.cli("stop").returncode == 0
    subscriber.close()
