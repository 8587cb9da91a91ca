"""Count what a chaos run produced and what each destination got, had
dropped by its cap and lost, and what the station's processes used, from the
producers' records, the recorders and the sampler. For each destination,
`lost` = produced - delivered - dropped by its cap must be 0."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from .observers import Key, Recorder, Sample
from .station import PRODUCERS, TENTA_DESTINATION, THINGSBOARD_DESTINATION

if TYPE_CHECKING:
    from .harness import Run

_WARM_UP_S = 60.0  # memory is not judged while a process starts up
_MIN_SEGMENT_S = 300.0  # a slope needs a process that lived this long


def read_records(record_dir: str) -> tuple[dict[Key, float], int]:
    """Every accepted message in the producers' records (key -> monotonic time
    of acceptance) and how many `add_message` calls were refused."""
    produced: dict[Key, float] = {}
    refused = 0
    for producer in PRODUCERS:
        path = os.path.join(record_dir, f"{producer}.record")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                if line.startswith("refused"):
                    refused += 1
                    continue
                parts = line.split()
                if len(parts) == 3:  # a line cut by a kill is not a record
                    produced[(int(parts[0]), int(parts[1]))] = float(parts[2])
    return produced, refused


def oldest_first_violations(
    produced: dict[Key, float],
    arrivals: dict[Key, float],
    outages: list[dict[str, Any]],
) -> int:
    """Messages the size cap dropped although an older message of the same
    producer that was queued with it was kept. The queue is a FIFO: rows leave
    it oldest first, delivered or dropped. So the messages whose fate an
    outage decided are, per producer incarnation, those newer than the newest
    delivered before the outage began and not newer than the newest delivered
    before the next one began. Among them, once the missing ones begin, a kept
    one must not be followed by another missing one. (Kept messages before
    the first missing one were in flight when the broker went away: the cap
    never drops those, they may have reached the broker.)"""
    by_incarnation: dict[int, list[tuple[int, float | None]]] = defaultdict(list)
    for key in produced:
        by_incarnation[key[0]].append((key[1], arrivals.get(key)))
    starts = sorted(outage["back"] - outage["seconds"] for outage in outages)
    violations = 0
    for messages in by_incarnation.values():
        messages.sort()

        def newest_delivered_before(
            moment: float, messages: list[tuple[int, float | None]] = messages
        ) -> int:
            return max(
                (seq for seq, arrival in messages if arrival is not None and arrival < moment),
                default=-1,
            )

        for index, began in enumerate(starts):
            lowest = newest_delivered_before(began)
            highest = (
                newest_delivered_before(starts[index + 1]) if index + 1 < len(starts) else None
            )
            dropping, kept_after_drops = False, False
            for seq, arrival in messages:
                if seq <= lowest or (highest is not None and seq > highest):
                    continue
                if arrival is None:
                    violations += kept_after_drops
                    dropping = True
                elif dropping:
                    kept_after_drops = True
    return violations


def _slope_per_hour(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 3600


def memory_slopes(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Per role, over its longest-lived process (after a warm-up): the slope of
    RSS and PSS (MiB per hour) and open file descriptors (per hour). Roles
    whose processes never lived `_MIN_SEGMENT_S` get none."""
    segments: dict[tuple[str, int], list[tuple[float, float, float, int]]] = defaultdict(list)
    for sample in samples:
        for role, (pid, rss, pss, _, fds) in sample.processes.items():
            segments[(role, pid)].append((sample.at, rss, pss, fds))
    slopes: dict[str, dict[str, float]] = {}
    for (role, _), points in sorted(segments.items(), key=lambda item: len(item[1])):
        settled = [p for p in points if p[0] >= points[0][0] + _WARM_UP_S]
        if not settled or settled[-1][0] - settled[0][0] < _MIN_SEGMENT_S:
            continue
        slopes[role] = {
            "observed_s": round(settled[-1][0] - settled[0][0]),
            "rss_mib_per_hour": round(_slope_per_hour([(p[0], p[1]) for p in settled]), 3),
            "pss_mib_per_hour": round(_slope_per_hour([(p[0], p[2]) for p in settled]), 3),
            "fds_per_hour": round(_slope_per_hour([(p[0], float(p[3])) for p in settled]), 3),
            "rss_mib_last": round(settled[-1][1], 1),
        }
    return slopes


def queue_after_outages(
    samples: list[Sample], outages: list[dict[str, Any]], steady: int
) -> list[float | None]:
    """Seconds after each outage until the queue was back to its steady depth
    (`steady` rows, about two seconds of production); None if it never was."""
    result: list[float | None] = []
    for outage in outages:
        back = outage["back"]
        drained = next(
            (
                s.at - back
                for s in samples
                if s.at >= back and s.queued is not None and s.queued <= steady
            ),
            None,
        )
        result.append(round(drained, 1) if drained is not None else None)
    return result


def destination_report(
    produced: dict[Key, float],
    recorder: Recorder,
    dropped: int,
    outages: list[dict[str, Any]],
) -> dict[str, Any]:
    """What one destination got of what was produced: `lost` = missing -
    dropped by its cap, which must be 0; its outages get their delivery delay."""
    with recorder.lock:
        arrivals = dict(recorder.arrivals)
        copies = dict(recorder.copies)
        violations = list(recorder.violations)
    delivered = {key for key in produced if key in arrivals}
    missing = len(produced) - len(delivered)
    delays = []
    for outage in outages:
        began, back = outage["back"] - outage["seconds"], outage["back"]
        backlog = [
            arrivals[key]
            for key, at in produced.items()
            if at < back and key in arrivals and arrivals[key] >= began
        ]
        outage["delivery_delay_after_return_s"] = round(max(backlog) - back, 2) if backlog else 0
        delays.append(outage["delivery_delay_after_return_s"])
    return {
        "delivered": len(delivered),
        "duplicates": sum(count - 1 for key, count in copies.items() if key in produced),
        "dropped_by_policy": dropped,
        "lost": missing - dropped,
        "missing": missing,
        "delivered_not_recorded": len(set(arrivals) - set(produced)),
        "oldest_first_violations": oldest_first_violations(produced, arrivals, outages),
        "payloads_a_server_would_drop": len(violations),
        "max_delivery_delay_after_broker_returned_s": max(delays, default=0),
        "violations": violations[:5],
    }


def build_report(run: Run, samples: list[Sample]) -> dict[str, Any]:
    """The JSON report of a run (see the module docstring): per destination,
    and their sums."""
    produced, refused = read_records(run.station.record_dir)
    archived, unreadable_archive_lines = run.station.archived_chaos_keys()
    # a producer killed between `add_message` returning and writing its record
    # leaves an accepted message only the archive knows of: it counts (a
    # destination's cap may drop it), at the time of the record before it
    unrecorded = archived - set(produced)
    accepted = {**produced}
    for incarnation, sequence in unrecorded:
        accepted[(incarnation, sequence)] = produced.get((incarnation, sequence - 1), 0.0)
    recorders = {TENTA_DESTINATION: run.recorder, THINGSBOARD_DESTINATION: run.monitoring_recorder}
    destinations: dict[str, dict[str, Any]] = {}
    for name, recorder in recorders.items():
        dropped = max((s.dropped.get(name, 0) for s in samples if s.dropped is not None), default=0)
        outages = [o for o in run.outages if o["destination"] == name]
        destinations[name] = destination_report(accepted, recorder, dropped, outages)
    violations = [v for d in destinations.values() for v in d.pop("violations")]
    roles_seen: dict[str, set[int]] = defaultdict(set)
    for sample in samples:
        for role, values in sample.processes.items():
            roles_seen[role.split("-")[0] if role.startswith("child-") else role].add(values[0])
    steady = int(2 * run.settings.messages_per_second) + 100
    drained = queue_after_outages(samples, run.outages, steady)

    def total(key: str) -> int:
        return sum(int(d[key]) for d in destinations.values())

    report: dict[str, Any] = {
        "seed": run.settings.seed,
        "settings": {
            "duration_s": run.settings.duration_s,
            "messages_per_second": run.settings.messages_per_second,
            "max_queued_messages": run.settings.max_queued_messages,
            "data_dir_tmpfs_mib": run.settings.data_tmpfs_mib if run.station.mounted else None,
            "clock": "wallclock.c preloaded: CLOCK_REALTIME stepped, CLOCK_MONOTONIC real",
        },
        "run_s": round(samples[-1].at - run.started, 1) if samples else None,
        "produced": len(produced),
        # the sums over the destinations; each one's own figures below
        "lost": total("lost"),
        "missing": total("missing"),
        "dropped_by_policy": total("dropped_by_policy"),
        "oldest_first_violations": total("oldest_first_violations"),
        "payloads_a_server_would_drop": len(violations),
        "destinations": destinations,
        "refused_by_add_message": refused,
        "accepted_but_not_recorded": len(unrecorded),
        "not_in_archive": len(set(produced) - archived),
        "unreadable_archive_lines": unreadable_archive_lines,
        "queue_back_to_steady_after_outage_s": drained,
        "failovers": run.failovers,
        "process_restarts": {role: len(pids) - 1 for role, pids in sorted(roles_seen.items())},
        "peak_pss_mib": round(max((s.total_pss() for s in samples), default=0.0), 1),
        "memory_slopes": memory_slopes(samples),
        "faults": run.events,
        "outages": [{k: v for k, v in o.items() if k != "back"} for o in run.outages],
        "full_disk_unavailable": run.station.full_disk_unavailable,
        "problems": run.problems + violations[:5],
    }
    report["ok"] = (
        all(
            d["lost"] == 0 and d["missing"] == d["dropped_by_policy"] for d in destinations.values()
        )
        and report["oldest_first_violations"] == 0
        and report["not_in_archive"] == 0
        and not report["problems"]
        and None not in drained
    )
    return report
