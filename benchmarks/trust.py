"""Benchmark `trust`: what verification costs, side by side with doing without.

- `release_fetch_verified_s`: fetching a release as an update does now (a
  fresh repository, `git fetch` of exactly its tag, the tag's name and SSH
  signature checked with `git verify-tag`, the verified commit checked out and
  recorded), against fetching it as updates did before the trust policy
  (`git clone --depth 1 --branch v<version>`, nothing verified): the same
  releases repository, alternately, the median of each;
- `config_admission_verified_s`: admitting a signed config on arrival
  (`ssh-keygen -Y find-principals` and `-Y verify`, the document checked),
  against reading the same config unsigned as before (parse and validate the
  revision and version).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

from src import constants
from src.types import ForeignConfig
from src.utils.update.signatures import verify_envelope
from src.utils.update.source import fetch_release
from src.utils.update.trust import config_signers_path, load_policy

from .common import Figure, median_of_alternating
from .production import GOOD, make_releases, station_config
from .signing import trust_station

_BENCHMARK = "trust"


def _seconds(action: object) -> float:
    started = time.perf_counter()
    if callable(action):
        action()
    return time.perf_counter() - started


def run(quick: bool) -> Iterator[Figure]:
    """Both figures, each the median of alternating runs."""
    scratch = tempfile.mkdtemp(prefix="ivy-bench-trust-")
    root_before = constants.ROOT_DIR
    try:
        releases = make_releases(os.path.join(scratch, "releases"))
        root = os.path.join(scratch, "root")
        trust_station(
            root,
            [releases.config_key],
            [releases.release_key],
            release_source={"source": "git", "repository": releases.repository},
        )
        # this process stands in for a station whose root is `root`
        constants.ROOT_DIR = root
        policy = load_policy()
        assert policy is not None
        rounds = 3 if quick else 11

        def verified() -> float:
            shutil.rmtree(os.path.join(root, GOOD), ignore_errors=True)
            return _seconds(lambda: fetch_release(policy, GOOD, None, lambda _: None))

        def as_before() -> float:
            target = os.path.join(scratch, "clone")
            shutil.rmtree(target, ignore_errors=True)
            return _seconds(
                lambda: subprocess.run(
                    [
                        "git",
                        "-c",
                        "advice.detachedHead=false",
                        "clone",
                        "--quiet",
                        "--depth",
                        "1",
                        "--branch",
                        f"v{GOOD}",
                        "--",
                        releases.repository,
                        target,
                    ],
                    check=True,
                    capture_output=True,
                )
            )

        ours, baseline = median_of_alternating(rounds, verified, as_before)
        yield Figure(
            _BENCHMARK,
            "release_fetch_verified_s",
            ours,
            "s",
            "git clone --depth 1 --branch, unverified (before)",
            baseline,
        )

        config = station_config(releases, GOOD, 1)
        envelope = releases.config_key.sign(config)
        station = config["general"]["system_identifier"]
        raw = json.dumps(config).encode()

        def admitted() -> float:
            return _seconds(lambda: verify_envelope(envelope, config_signers_path(), station))

        def unsigned() -> float:
            return _seconds(lambda: ForeignConfig.model_validate(json.loads(raw)))

        ours, baseline = median_of_alternating(rounds * 3, admitted, unsigned)
        yield Figure(
            _BENCHMARK,
            "config_admission_verified_s",
            ours,
            "s",
            "parsing the same config unsigned (before)",
            baseline,
        )
    finally:
        constants.ROOT_DIR = root_before
        shutil.rmtree(scratch, ignore_errors=True)
