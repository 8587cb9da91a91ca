"""`ivy fleet status|rollout|halt|rollback`: the click commands; the work is
in the modules beside this one."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Literal, NoReturn

import click

from src.utils.durations import parse_duration

from .broker import FleetBroker, FleetBrokerError
from .inventory import Inventory, InventoryError, load_inventory
from .rollout import (
    DEFAULT_WAVES,
    FOLLOWED_BELOW,
    FailureLimit,
    Rollout,
    RolloutError,
    change_digest,
    next_revision,
    parse_waves,
    restore,
    revisions_in_use,
)
from .store import RolloutRecord, RolloutStore, Target
from .view import DEFAULT_UNREACHABLE_AFTER_SECONDS, StationView, is_reachable, summary, view

# exit codes like `ivy status`: 0 all fine, 1 cannot tell or halted, 3 some unhealthy
_EXIT_UNHEALTHY = 3


def _fail(message: str) -> NoReturn:
    click.echo(message, err=True)
    raise SystemExit(1)


def _inventory(path: str) -> Inventory:
    try:
        return load_inventory(path)
    except InventoryError as e:
        _fail(str(e))


def _duration(value: str, option: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


def _connected(inventory: Inventory, session: str | None = None) -> FleetBroker:
    """Connected through the rollout's persistent session, or (`session`)
    a clean one of this command's own."""
    broker = FleetBroker(inventory.broker, inventory.ids(), session)
    try:
        broker.connect()
    except FleetBrokerError as e:
        _fail(str(e))
    return broker


def printable(text: str) -> str:
    """`text` without control characters (a station's reason must not drive
    the operator's terminal)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _progress(line: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} {printable(line)}", err=True)


inventory_option = click.option(
    "--inventory",
    "inventory_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="JSON or TOML file: the broker and the stations.",
)
store_option = click.option(
    "--store",
    "store_path",
    type=click.Path(dir_okay=False),
    help="The rollout database (default: ~/.local/state/ivy/fleet.sqlite3).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
def fleet() -> None:
    """A fleet of stations through the broker they share: see them all, roll a
    change out in waves that stop on failure, halt it, roll it back."""


@fleet.command("status")
@inventory_option
@click.option(
    "--unreachable-after",
    default="15min",
    show_default=True,
    help="A station not heard of for this long is unreachable.",
)
@json_option
def fleet_status(inventory_path: str, unreachable_after: str, as_json: bool) -> None:
    """One line per station and a summary. Exit code: 0 every station
    healthy, 3 some unhealthy, unreachable or never heard of, 1 the broker
    cannot be reached."""
    inventory = _inventory(inventory_path)
    after = _duration(unreachable_after, "--unreachable-after")
    broker = _connected(inventory, f"status-{os.getpid()}")
    try:
        broker.settle()
        views = [view(s, broker.seen(s), after) for s in inventory.ids()]
    finally:
        broker.close()
    if as_json:
        click.echo(
            json.dumps(
                {"summary": summary(views), "stations": [_view_json(v) for v in views]}, indent=2
            )
        )
    else:
        for station_view in views:
            click.echo(printable(view_line(station_view)))
        counts = summary(views)
        click.echo(
            f"{counts['stations']} station(s): "
            + ", ".join(f"{n} {c}" for c, n in sorted(counts["conditions"].items()))  # type: ignore[attr-defined]
            + f"; versions {counts['versions']}; revisions {counts['revisions']}"
        )
    if any(v.condition != "healthy" for v in views):
        raise SystemExit(_EXIT_UNHEALTHY)


def _view_json(station_view: StationView) -> dict[str, Any]:
    report = station_view.sightings.report
    return {
        "station": station_view.station,
        "condition": station_view.condition,
        "unreachable_since": station_view.since,
        "online": station_view.sightings.online,
        "report": None if report is None else report.model_dump(mode="json"),
    }


def view_line(station_view: StationView) -> str:
    """One station's line in `ivy fleet status` (before escaping for the terminal)."""
    report = station_view.sightings.report
    line = f"{station_view.station}  {station_view.condition}"
    if station_view.condition == "unreachable" and station_view.since is not None:
        line += f" since {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(station_view.since))}"
    if report is not None:
        line += (
            f"  Ivy {report.version}  revision {report.config_revision}  backlog {report.backlog}"
        )
        if report.last_config is not None:
            line += f"  last config {report.last_config.revision}: {report.last_config.status}"
        if report.problems:
            line += f"  problems: {'; '.join(report.problems)}"
    return line


@fleet.command("rollout")
@click.argument("change_path", metavar="CHANGE", type=click.Path(dir_okay=False, exists=True))
@inventory_option
@click.option(
    "--key",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Your OpenSSH private key (a config signer of the stations).",
)
@click.option(
    "--waves",
    default=DEFAULT_WAVES,
    show_default=True,
    help="How many stations have started after each wave: counts or percentages.",
)
@click.option(
    "--max-failures",
    default="0",
    show_default=True,
    help="Halt when more stations than this fail (N, or P%% of the answers).",
)
@click.option(
    "--min-answers",
    default=1,
    show_default=True,
    help="Answers needed before a percentage --max-failures can halt.",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="Only stations in this group (repeatable); waves follow the inventory's order.",
)
@click.option(
    "--answer-timeout",
    default="15min",
    show_default=True,
    help="A station reachable when sent that has not answered by then counts as failed.",
)
@click.option(
    "--unreachable-after",
    default="15min",
    show_default=True,
    help="A station not heard of for this long is unreachable (not waited for).",
)
@store_option
@json_option
def fleet_rollout(
    change_path: str,
    inventory_path: str,
    key: str,
    waves: str,
    max_failures: str,
    min_answers: int,
    groups: tuple[str, ...],
    answer_timeout: str,
    unreachable_after: str,
    store_path: str | None,
    as_json: bool,
) -> None:
    """Roll CHANGE (a JSON merge patch of the settings to change) out to the
    inventory's stations in waves, signed for each. Running it again with the
    same change and stations resumes an unfinished rollout. Exit code 0 when
    every reachable station accepted, 1 when it halted."""
    inventory = _inventory(inventory_path)
    try:
        with open(change_path, encoding="utf-8") as f:
            change = json.load(f)
    except (OSError, ValueError) as e:
        _fail(f"{change_path}: not a JSON merge patch ({e})")
    if not isinstance(change, dict) or not change:
        _fail(f"{change_path}: a change is a JSON object naming the settings to change")
    stations = [s.id for s in inventory.stations if not groups or set(groups) & set(s.groups)]
    if not stations:
        _fail("no station of the inventory is in the groups given")
    try:
        limit = FailureLimit.parse(max_failures, min_answers)
        ends = parse_waves(waves, len(stations))
    except RolloutError as e:
        _fail(str(e))
    plan = {
        "waves": waves,
        "max_failures_count": limit.count,
        "max_failures_percent": limit.percent,
        "min_answers": limit.min_answers,
    }
    _run(
        inventory,
        inventory_path,
        key,
        "patch",
        change,
        stations,
        ends,
        plan,
        store_path,
        _duration(answer_timeout, "--answer-timeout"),
        _duration(unreachable_after, "--unreachable-after"),
        as_json,
    )


def _run(
    inventory: Inventory,
    inventory_path: str,
    key: str,
    kind: Literal["patch", "revert"],
    change: Any,
    stations: list[str],
    ends: list[int],
    plan: dict[str, Any],
    store_path: str | None,
    answer_timeout: float,
    unreachable_after: float,
    as_json: bool,
    rolls_back: int | None = None,
) -> None:
    """Start (or resume) a rollout and run it to its end."""
    store = RolloutStore(store_path)
    broker = _connected(inventory)
    try:
        broker.settle()
        digest = change_digest(kind, change, stations)
        record = store.latest("running", digest)
        if record is not None:
            _progress(f"resuming rollout {record.id} (revision {record.revision})")
        else:
            in_use = {s: revisions_in_use(broker.seen(s)) for s in stations}
            highest_sent = store.highest_revision()
            found = next_revision(highest_sent, set().union(*in_use.values()))
            if found is None:
                _fail(f"no revision is left above {highest_sent} (revisions end at 2**31 - 1)")
            revision = found
            suspects = sorted(
                s for s, used in in_use.items() if max(used, default=0) >= FOLLOWED_BELOW
            )
            if suspects:
                _progress(
                    f"warning: {', '.join(map(printable, suspects))} report(s) a config revision "
                    f"of {FOLLOWED_BELOW} or more, not followed: signing revision {revision} "
                    "(if nobody pushed such a revision, those reports are forged: check the "
                    "broker's ACL)"
                )
            waves = [stations[start:end] for start, end in zip([0, *ends], ends, strict=False)]
            plan = {**plan, "wave_sizes": [len(wave) for wave in waves]}
            rollout_id = store.create(
                inventory=inventory_path,
                kind=kind,
                change=change,
                change_digest=digest,
                revision=revision,
                plan=plan,
                waves=waves,
                rolls_back=rolls_back,
            )
            record = store.rollout(rollout_id)
            assert record is not None
            _progress(
                f"rollout {record.id}: revision {revision} to {len(stations)} station(s) in "
                f"{len(waves)} wave(s) ({', '.join(str(len(w)) for w in waves)})"
            )
        rollout = Rollout(
            store,
            record,
            broker,
            key,
            _progress,
            answer_timeout=answer_timeout,
            unreachable_after=unreachable_after,
        )
        try:
            final = rollout.run()
        except (RolloutError, FleetBrokerError) as e:
            _fail(f"rollout {record.id} stopped: {e} (run the same command again to resume)")
        except KeyboardInterrupt:
            _fail(f"rollout {record.id} interrupted: run the same command again to resume it")
        targets = store.targets(record.id)
        unreachable_now = {
            t.station
            for t in targets
            if t.status == "sent" and not _reachable(broker, t.station, unreachable_after)
        }
    finally:
        broker.close()
    _report(record, final, targets, unreachable_now, as_json)
    failed = any(t.status in ("rejected", "no_answer") for t in targets)
    if final != "done" or failed:
        raise SystemExit(1)


def _reachable(broker: FleetBroker, station: str, unreachable_after: float) -> bool:
    return is_reachable(broker.seen(station), unreachable_after)


def _report(
    record: RolloutRecord,
    final: str,
    targets: list[Target],
    unreachable_now: set[str],
    as_json: bool,
) -> None:
    groups: dict[str, list[Target]] = {}
    for target in targets:
        status = "unreachable" if target.station in unreachable_now else target.status
        groups.setdefault(status, []).append(target)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "rollout": record.id,
                    "revision": record.revision,
                    "state": final,
                    "stations": {
                        status: [{"station": t.station, "reason": t.reason} for t in members]
                        for status, members in groups.items()
                    },
                },
                indent=2,
            )
        )
        return
    click.echo(f"rollout {record.id} (revision {record.revision}): {final}")
    for status in (
        "accepted",
        "rejected",
        "no_answer",
        "unreachable",
        "sent",
        "withdrawn",
        "not_sent",
    ):
        members = groups.get(status, [])
        if members:
            click.echo(f"  {status} ({len(members)}):")
            for target in members:
                reason = f": {printable(target.reason)}" if target.reason else ""
                click.echo(f"    {target.station}{reason}")


@fleet.command("halt")
@click.option(
    "--inventory",
    "inventory_path",
    type=click.Path(dir_okay=False, exists=True),
    help="The inventory (default: the one the rollout was started with).",
)
@store_option
def fleet_halt(inventory_path: str | None, store_path: str | None) -> None:
    """Halt the running rollout: no further station starts the change, and
    those sent it that have not answered get their previous config back."""
    store = RolloutStore(store_path)
    record = store.latest("running")
    if record is None:
        _fail("no rollout is running")
    inventory = _inventory(inventory_path or record.inventory)
    to_restore = store.halt(record.id, "halted by the operator (ivy fleet halt)")
    broker = _connected(inventory, f"halt-{os.getpid()}")
    try:
        for target in to_restore:
            try:
                restore(broker, store, record.id, target)
            except RolloutError as e:
                click.echo(str(e), err=True)
    finally:
        broker.close()
    click.echo(
        f"rollout {record.id} halted: no further station starts it; the previous config "
        f"topic content is back for the {len(to_restore)} station(s) sent it without an "
        "answer (one that received it already may still try it: see `ivy fleet rollback`)"
    )


@fleet.command("rollback")
@inventory_option
@click.option(
    "--key",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Your OpenSSH private key (a config signer of the stations).",
)
@click.option("--rollout", "rollout_id", type=int, help="Which rollout (default: the newest).")
@click.option("--answer-timeout", default="15min", show_default=True)
@store_option
@json_option
def fleet_rollback(
    inventory_path: str,
    key: str,
    rollout_id: int | None,
    answer_timeout: str,
    store_path: str | None,
    as_json: bool,
) -> None:
    """Send the stations that took a rollout's change the config they ran
    before it (a signed revert: each station keeps its own previous config,
    secrets included), in one wave."""
    inventory = _inventory(inventory_path)
    store = RolloutStore(store_path)
    record = store.rollout(rollout_id) if rollout_id is not None else _newest_change(store)
    if record is None:
        _fail("no such rollout")
    took = [t.station for t in store.targets(record.id) if t.status == "accepted"]
    broker = _connected(inventory, f"rollback-{os.getpid()}")
    try:
        broker.settle()
        took += [
            s
            for s in inventory.ids()
            if s not in took
            and (report := broker.seen(s).report) is not None
            and report.config_revision == record.revision
        ]
        # a revert to the config before this change would undo a later one too
        moved_on = {
            s: report.config_revision
            for s in took
            if (report := broker.seen(s).report) is not None
            and report.config_revision is not None
            and report.config_revision > record.revision
        }
    finally:
        broker.close()
    for station, revision in sorted(moved_on.items()):
        _progress(
            f"{printable(station)} runs revision {revision} now, not {record.revision}: "
            "left alone (rolling back would undo that later change too)"
        )
    took = [s for s in took if s not in moved_on]
    if not took:
        _fail(
            f"no station runs rollout {record.id}'s change (revision {record.revision}) any more"
            if moved_on
            else f"no station took rollout {record.id}'s change (revision {record.revision})"
        )
    _run(
        inventory,
        inventory_path,
        key,
        "revert",
        record.revision,
        took,
        [len(took)],
        {"waves": "100%", "max_failures_percent": 100.0, "min_answers": 1},
        store_path,
        _duration(answer_timeout, "--answer-timeout"),
        DEFAULT_UNREACHABLE_AFTER_SECONDS,
        as_json,
        rolls_back=record.id,
    )


def _newest_change(store: RolloutStore) -> RolloutRecord | None:
    """The newest rollout that is not itself a rollback."""
    record = store.latest()
    while record is not None and record.kind == "revert":
        record = store.rollout(record.id - 1)
    return record
