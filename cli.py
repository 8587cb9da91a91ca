#!/usr/bin/env python3
"""The operator's command line, installed as the console script `ivy`.

Exit codes: 0 ok, 1 refused or not running, 2 usage error.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, NoReturn

import click

from src import constants
from src import procedures as procedure_modules
from src.fleet.commands import fleet
from src.types import Config, ConfigError
from src.types.config import LEGACY_DESTINATION, MIN_MASKED_SECRET_LENGTH, secret_values
from src.types.status import DestinationStatus, StationStatus
from src.utils import mainloop_toggle
from src.utils.durations import parse_duration
from src.utils.lifecycle_manager import backend_teardown_seconds
from src.utils.log_reader import (
    TimeArgumentError,
    entry_matches,
    parse_entries,
    parse_time_argument,
    read_entries,
)
from src.utils.message_export import select_messages, write_messages
from src.utils.messaging_agent import MessagingAgent
from src.utils.station_status import (
    DEFAULT_MAX_DISCONNECTED_SECONDS,
    DEFAULT_MAX_QUEUE_AGE_SECONDS,
    collect_status,
    health_problems,
)


def _fail(message: str) -> NoReturn:
    click.echo(message, err=True)
    raise SystemExit(1)


def _load_config_or_fail() -> Config:
    try:
        return Config.load()
    except ConfigError as e:
        _fail(str(e))


def _stop_timeout(config: Config | None) -> float:
    drain = backend_teardown_seconds(config) if config is not None else 3_600.0
    return constants.SECONDS_PER_GRACEFUL_PROCEDURE_TEARDOWN + drain + 15


class _OperatorGroup(click.Group):
    """Turns unexpected exceptions into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as e:
            click.echo(f"error: {type(e).__name__}: {e}", err=True)
            raise SystemExit(1) from None


@click.group(cls=_OperatorGroup)
def cli() -> None:
    """Ivy: data-acquisition supervisor of this sensor station."""
    if os.path.exists(constants.DATA_DIR) and not os.path.isdir(constants.DATA_DIR):
        _fail(f"the data directory {constants.DATA_DIR} is not a directory (see IVY_DATA_DIR)")


@cli.command()
def start() -> None:
    """Start the main loop in the background; return once it is up."""
    for problem in _config_warnings(_load_config_or_fail()):
        click.echo(f"warning: {problem}", err=True)
    from src.utils.station_status import trust_lines

    for line in trust_lines():
        click.echo(f"trust: {line}", err=True)
    try:
        pid = mainloop_toggle.start_mainloop()
    except mainloop_toggle.MainloopToggleError as e:
        _fail(str(e))
    click.echo(f"Ivy started (main loop pid {pid})")


@cli.command()
def run() -> None:
    """Run the main loop in the foreground (what systemd runs)."""
    import run as run_py

    sys.exit(run_py.main())


@cli.command()
def stop() -> None:
    """Stop the main loop and wait until every process of Ivy is gone."""
    if not mainloop_toggle.is_running():
        _fail("Ivy is not running")
    try:
        config: Config | None = Config.load()
    except ConfigError:
        config = None
    mainloop_toggle.stop_mainloop(timeout=_stop_timeout(config))
    click.echo("Ivy stopped")


@cli.command()
@click.pass_context
def restart(ctx: click.Context) -> None:
    """Stop Ivy if it runs, then start it."""
    config = _load_config_or_fail()
    if mainloop_toggle.is_running():
        mainloop_toggle.stop_mainloop(timeout=_stop_timeout(config))
        click.echo("Ivy stopped")
    ctx.invoke(start)


@cli.command("is-running")
def is_running() -> None:
    """Exit 0 when Ivy runs, 1 when it does not."""
    pid = mainloop_toggle.get_mainloop_pid()
    if pid is None and not mainloop_toggle.is_running():
        _fail("Ivy is not running")
    click.echo(f"Ivy is running (main loop pid {pid})")


@cli.command()
def info() -> None:
    """Print the version and the paths this installation uses."""
    rows = {
        "version": constants.VERSION.root,
        "project directory": constants.PROJECT_DIR,
        "root directory": constants.ROOT_DIR,
        "data directory": constants.DATA_DIR,
        "config file": constants.CONFIG_PATH,
        "python": sys.executable,
    }
    for key, value in rows.items():
        click.echo(f"{key + ':':<20}{value}")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option(
    "--max-disconnected",
    default=DEFAULT_MAX_DISCONNECTED_SECONDS,
    show_default=True,
    help="Seconds the backend may be disconnected before the station counts as unhealthy.",
)
@click.option(
    "--max-queue-age",
    default=DEFAULT_MAX_QUEUE_AGE_SECONDS,
    show_default=True,
    help="Seconds the oldest unsent message may wait before the station counts as unhealthy.",
)
def status(as_json: bool, max_disconnected: float, max_queue_age: float) -> None:
    """Show the station at a glance; the exit code says whether it is healthy:
    0 healthy, 1 not running, 3 running but unhealthy (the reasons are listed)."""
    s = collect_status()
    s.problems = health_problems(s, max_disconnected, max_queue_age)
    if as_json:
        click.echo(s.model_dump_json(indent=2))
    else:
        _print_status(s)
    if not s.running:
        raise SystemExit(1)
    if s.problems:
        raise SystemExit(3)


def _paint(text: str, color: str) -> str:
    """Colour on a terminal; plain when piped or when NO_COLOR is set."""
    if os.environ.get("NO_COLOR") or not sys.stdout.isatty():
        return text
    return click.style(text, fg=color, bold=color == "red")


def _print_destination(name: str, destination: DestinationStatus, now: float) -> None:
    """The broker line of one destination, and what it has still to get."""
    label = "broker:  " if name == LEGACY_DESTINATION else f"{name} ({destination.provider}): "
    b = destination.connection
    if b is not None:
        acknowledged = (
            f", last acknowledgment {_age(now - b.last_acknowledgment)} ago"
            if b.last_acknowledgment
            else ""
        )
        connected = _paint("connected", "green") if b.connected else _paint("NOT CONNECTED", "red")
        since = _age(now - b.since) if b.since is not None else "-"
        click.echo(f"{label}{connected} ({b.detail}, since {since}){acknowledged}")
    if name != LEGACY_DESTINATION or destination.dropped:
        click.echo(
            f"{' ' * 9}{destination.backlog} to send, oldest "
            f"{_age(destination.oldest_age_seconds)} old, {destination.dropped} dropped for it"
        )


def _print_status(s: StationStatus) -> None:
    now = time.time()
    m = s.mainloop
    if s.running:
        state = _paint("running", "green" if not s.problems else "yellow")
        click.echo(
            f"Ivy {s.version}: {state} (pid {m.pid}, up {_age(m.uptime_seconds)}, "
            f"heartbeat {_age(m.heartbeat_age_seconds)} ago)"
        )
    else:
        click.echo(f"Ivy {s.version}: {_paint('not running', 'red')}")
    c = s.config
    if c.valid:
        click.echo(
            f"config:  revision {c.revision}, version {c.software_version}, "
            f"station {c.system_identifier}, backend {c.backend or 'none (local only)'}"
        )
    else:
        click.echo(f"config:  {_paint('INVALID', 'red')} (see `ivy config check`)")
    u = s.update
    if u is not None:
        click.echo(
            f"update:  to {u.version} (config revision {u.config_revision}): "
            f"{u.step} for {_age(now - u.step_started_at)}, "
            f"{_age(now - u.started_at)} in all"
        )
    for name, destination in s.destinations.items():
        _print_destination(name, destination, now)
    q = s.queue
    click.echo(
        f"queue:   {q.depth} unsent, oldest {_age(q.oldest_age_seconds)} old, "
        f"{q.dropped} dropped by the size cap, {q.poisoned} poison row(s)"
    )
    click.echo(
        f"disk:    {s.disk.free_gb:.1f} GB free on the data partition, {s.disk.used_percent}% used"
    )
    for line in s.trust:
        warn = line.split(":")[0].isupper() or line.startswith(("no trust", "the trust"))
        click.echo(f"trust:   {_paint(line, 'red') if warn else line}")
    if s.processes:
        click.echo(f"\n  {'PROCESS':<20}{'STATE':<14}{'PID':<9}{'RESTARTS':<10}LAST ERROR")
        for name, p in s.processes.items():
            word, color = (
                ("crash loop", "red")
                if p.crash_looping
                else (("alive", "green") if p.alive else ("dead", "red"))
            )
            state = _paint(word, color) + " " * (14 - len(word))
            error = "-"
            if p.last_error:
                error = (
                    f"{p.last_error} ({_age(now - p.last_error_at)} ago)"
                    if p.last_error_at
                    else p.last_error
                )
            click.echo(f"  {name:<20}{state}{p.pid or '-'!s:<9}{p.restarts:<10}{error}")
    for problem in s.problems:
        click.echo(_paint(f"unhealthy: {problem}", "red"))


_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "EXCEPTION"], case_sensitive=False)


def _time_option(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_time_argument(value)
    except TimeArgumentError as e:
        raise click.BadParameter(str(e)) from None


@cli.command()
@click.option("-n", "--lines", default=50, show_default=True, help="How many entries, the last.")
@click.option("-f", "--follow", is_flag=True, help="Then print new entries as they come.")
@click.option("-l", "--level", type=_LEVELS, help="Only entries at this level or above.")
@click.option("--since", help="From this time: 2026-11-23 04:00 (UTC), today, 30min, 2h, 3d.")
@click.option("--until", help="Up to this time (same forms as --since).")
@click.option("--origin", help="Only this origin (main, backend, a procedure; `name*` a prefix).")
def logs(
    lines: int,
    follow: bool,
    level: str | None,
    since: str | None,
    until: str | None,
    origin: str | None,
) -> None:
    """Print log entries (each line with its details) from the daily files."""
    min_level = level.upper() if level else None
    last = collections.deque(
        read_entries(_time_option(since), _time_option(until), min_level, origin), maxlen=lines
    )
    if not last and not follow:
        _fail("no log entries match")
    for entry in last:
        click.echo(entry.text)
    if follow:
        _follow_logs(min_level, origin)


def _follow_logs(min_level: str | None, origin: str | None) -> None:
    """Print entries appended to the log files until interrupted (Ctrl-C)."""
    from src.utils.functions import current_log_file_path

    path = current_log_file_path()
    offset = os.path.getsize(path) if os.path.exists(path) else 0
    showing = False
    try:
        while True:
            if path != current_log_file_path():  # a new UTC day: finish, then switch
                path, offset = current_log_file_path(), 0
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[: chunk.rfind("\n") + 1]
                offset += len(complete.encode())
                for line in complete.splitlines():
                    entry = next(iter(parse_entries([line])), None)
                    if entry is not None:
                        showing = entry_matches(entry, min_level, origin)
                    if showing:
                        click.echo(line)
            time.sleep(0.3)
    except KeyboardInterrupt:
        return


@cli.command()
@click.option("--since", help="From this time: 2026-11-23 04:00 (UTC), today, 30min, 2h, 3d.")
@click.option("--until", help="Up to this time (same forms as --since).")
@click.option("--variant", type=click.Choice(["data", "log", "config"]), help="Only this kind.")
@click.option("--key", help="Only data messages with this key (and only its values).")
@click.option(
    "--format",
    "form",
    type=click.Choice(["table", "csv", "jsonl"]),
    default="table",
    show_default=True,
)
def messages(
    since: str | None, until: str | None, variant: str | None, key: str | None, form: str
) -> None:
    """The station's own record of its messages (archive and queue), streamed."""
    selected = select_messages(_time_option(since), _time_option(until), variant, key)
    try:
        write_messages(selected, sys.stdout, form, key)  # type: ignore[arg-type]
    except BrokenPipeError:  # `ivy messages | head`
        sys.stderr.close()


@cli.command()
@click.option("-n", "--rows", default=10, show_default=True, help="How many of the oldest rows.")
def queue(rows: int) -> None:
    """The queue: depth, counters and the oldest unsent messages with their age."""
    agent = MessagingAgent()
    try:
        now = time.time()
        click.echo(
            f"{agent.get_queue_depth()} message(s) unsent, {agent.get_dropped_count()} dropped "
            f"by the size cap, {agent.get_poisoned_count()} poison row(s)"
        )
        for name in agent.destinations:
            click.echo(
                f"  {name}: {agent.get_queue_depth(name)} to send, oldest "
                f"{_age(agent.get_oldest_message_age(now, name))} old, "
                f"{agent.get_dropped_count(destination=name)} dropped for it"
            )
        for row in agent.get_oldest_rows(rows):
            click.echo(
                f"  {agent.identifier_of(row.id)}  {row.variant:<7}"
                f"{_age(now - row.timestamp):>10} old  {row.body[:80]}"
            )
    finally:
        agent.close()


@cli.group()
def config() -> None:
    """Create, check and show config/config.json."""


@config.command("init")
def config_init() -> None:
    """Create config/config.json from the template unless it exists."""
    if os.path.exists(constants.CONFIG_PATH):
        click.echo(f"{constants.CONFIG_PATH} exists; left unchanged")
        return
    Config.load_template().dump()
    click.echo(f"wrote {constants.CONFIG_PATH} from the template")


@config.command("check")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
def config_check(path: str | None) -> None:
    """Validate config/config.json (or PATH); exit 1 naming every bad field."""
    try:
        config = Config.load(path or constants.CONFIG_PATH)
    except ConfigError as e:
        _fail(str(e))
    problems = _config_warnings(config)
    for problem in problems:
        click.echo(f"warning: {problem}", err=True)
    if procedure_modules.PROBLEMS:
        _fail(f"{path or constants.CONFIG_PATH} is valid, but procedure modules are broken")
    click.echo(f"{path or constants.CONFIG_PATH} is valid")


def _config_warnings(config: Config) -> list[str]:
    """A config in Ivy 1.1's format, broken procedure modules, procedures
    that have no config section (they do not run), and secrets too short to
    be masked in log lines."""
    problems = list(procedure_modules.PROBLEMS.values())
    if config.migration_notice:
        problems.insert(0, config.migration_notice)
    revealed = json.loads(config.to_json(reveal_secrets=True))
    if any(len(v) < MIN_MASKED_SECRET_LENGTH for v in secret_values(revealed)):
        problems.append(
            f"a password or token is shorter than {MIN_MASKED_SECRET_LENGTH} characters: "
            "use a longer one (short secrets are not masked inside log lines, where they "
            "would garble ordinary words)"
        )
    sections = set((config.__pydantic_extra__ or {}).keys())
    for name in procedure_modules.PROCEDURES:
        if name not in sections:
            problems.append(
                f"procedure {name} has no section in the config, so it does not run "
                f'(add "{name}": {{...}}, or "{name}": null to say so)'
            )
    return problems


@config.command("migrate")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--output", type=click.Path(dir_okay=False), help="Write here (default: PATH).")
def config_migrate(path: str, output: str | None) -> None:
    """Rewrite a config in Ivy 1.1's format in this version's format (the
    original is kept as PATH.ivy-1.1); one line says what changed."""
    import shutil

    try:
        config = Config.load(path)
    except ConfigError as e:
        _fail(str(e))
    if not config.migration_notice:
        click.echo(f"{path} is in this version's format already; left unchanged")
        return
    if output is None:
        shutil.copy2(path, path + ".ivy-1.1")
    config.dump(output or path)
    click.echo(f"wrote {output or path}: {config.migration_notice.split('; `ivy config')[0]}")


@config.command("show")
def config_show() -> None:
    """Print the config with every secret redacted."""
    click.echo(_load_config_or_fail().to_json())


@config.command("reference")
def config_reference() -> None:
    """Print the config reference (Markdown), generated from the schema."""
    from src.utils.config_reference import render_config_reference

    click.echo(render_config_reference(), nl=False)


@config.command("schema")
def config_schema() -> None:
    """Print the config's JSON Schema (as in config/config.schema.json)."""
    from src.utils.config_reference import render_json_schema

    click.echo(render_json_schema(), nl=False)


def _boot_commands() -> tuple[list[str], list[str]]:
    """(foreground command, background start command): through the CLI
    pointer in a production root, so that boot always runs the version the
    updater switched to; this checkout's own files otherwise."""
    from src.utils.update.paths import cli_pointer_path

    pointer = cli_pointer_path()
    if os.path.isfile(pointer):
        return [pointer, "run"], [pointer, "start"]
    python, cli_py = sys.executable, os.path.join(constants.PROJECT_DIR, "cli.py")
    return [python, cli_py, "run"], [python, cli_py, "start"]


def _station_user() -> str:
    """Who the station runs as at boot: the owner of its data directory (or
    root directory), unless that is root; then `ivy`, a user to create."""
    import pwd

    for path in (constants.DATA_DIR, constants.ROOT_DIR):
        try:
            owner = os.stat(path).st_uid
        except OSError:
            continue
        if owner != 0:
            try:
                return pwd.getpwuid(owner).pw_name
            except KeyError:
                return str(owner)
    return "ivy"


@cli.command()
@click.argument("kind", type=click.Choice(["systemd", "cron"]))
@click.option(
    "--user",
    "user",
    help="Run the station as this user (default: the owner of the data directory, "
    "or `ivy` when that is root).",
)
def boot(kind: str, user: str | None) -> None:
    """Print a systemd unit or a crontab line that starts Ivy at boot. The
    unit runs the station as an unprivileged user in systemd's sandbox: no new
    privileges, a read-only system, write access to the production root only,
    and the trust policy read-only even there."""
    foreground, background = _boot_commands()
    if kind == "cron":
        # every minute: `start` does nothing while Ivy runs, and brings it back if not
        click.echo(f"* * * * * {shlex.join(background)} >/dev/null 2>&1")
        return
    try:
        config: Config | None = Config.load()
    except ConfigError:
        config = None
    from src.utils.update.paths import trust_directory

    user = user or _station_user()
    writable = sorted({constants.ROOT_DIR, constants.DATA_DIR})
    lines = [
        "# /etc/systemd/system/ivy.service",
        "[Unit]",
        "Description=Ivy data-acquisition supervisor",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "# the main loop (or the guard of a version on trial) says READY=1 and",
        "# WATCHDOG=1; one that hangs is restarted",
        "Type=notify",
        "NotifyAccess=main",
        f"WatchdogSec={int(_stop_timeout(config)) + 60}",
        "# an unprivileged user; the trust policy belongs to root (group: this user):",
        f"#   useradd --system --create-home {user}   (if it does not exist)",
        f"#   chown -R {user}: {constants.ROOT_DIR}",
        f"#   chown -R root:{user} {trust_directory()}",
        f"User={user}",
        f"WorkingDirectory={constants.ROOT_DIR}",
        f"Environment=IVY_ROOT_DIR={constants.ROOT_DIR}",
        f"Environment=IVY_DATA_DIR={constants.DATA_DIR}",
        f"ExecStart={shlex.join(foreground)}",
        "# SIGTERM to the main loop only; it stops its children in order",
        "KillMode=mixed",
        f"TimeoutStopSec={int(_stop_timeout(config))}",
        "Restart=always",
        "RestartSec=5",
        "# sandbox: code that got in anyway cannot widen what the station trusts",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        f"ReadWritePaths={' '.join(writable)}",
        f"ReadOnlyPaths={trust_directory()}",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "# instruments on serial ports: SupplementaryGroups=dialout",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    click.echo("\n".join(lines))


def _read_config_file(path: str) -> bytes:
    from src.utils.update.admission import MAX_CONFIG_BYTES

    try:
        with open(path, "rb") as f:
            content = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        _fail(f"{path}: {e.strerror}")
    if len(content) > MAX_CONFIG_BYTES:
        _fail(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    return content


@config.command("apply")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--wait",
    default=60.0,
    show_default=True,
    help="Seconds to wait for the outcome (an update takes longer; 0: do not wait).",
)
def config_apply(path: str, wait: float) -> None:
    """Apply a config file the way a remote config is applied: the same
    checks, acknowledgements and (for another software version) update. A
    local file needs no signature; a signed envelope is verified all the same."""
    from src.utils.update.local_change import LocalConfigRefused, queue_local_config

    try:
        pending = queue_local_config(path, _load_config_or_fail())
    except LocalConfigRefused as e:
        _fail(str(e))
    revision = pending.config.general.config_revision
    if not mainloop_toggle.is_running():
        click.echo(f"queued config revision {revision}; Ivy applies it when it starts")
        return
    click.echo(f"queued config revision {revision} for the running main loop")
    _wait_for_config_outcome(revision, wait)


def _wait_for_config_outcome(revision: int, wait: float) -> None:
    from src.utils.state_interface import StateInterface

    deadline = time.monotonic() + wait
    shown_step = None
    while time.monotonic() < deadline:
        state = StateInterface.load()
        for outcome in state.config_outcomes:
            if outcome.config_revision == revision:
                if outcome.status == "rejected":
                    _fail(f"rejected: {outcome.reason}")
                click.echo(f"{outcome.status} (Ivy {outcome.software_version})")
                return
        update = state.update_in_progress
        if update is not None and update.config_revision == revision:
            if update.step != shown_step:
                click.echo(f"updating to {update.version}: {update.step}")
                shown_step = update.step
        time.sleep(0.2)
    click.echo("no outcome yet; follow it with `ivy status` and `ivy logs`")


def _parse_duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@config.command("sign")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--key",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Your OpenSSH private key (or the public key of one in ssh-agent).",
)
@click.option(
    "--stations",
    help="Comma-separated station identifiers it is for "
    "(default: the config's general.system_identifier).",
)
@click.option("--expires", help="Refused by stations after this long: 90s, 30min, 12h, 7d.")
@click.option(
    "--patch",
    is_flag=True,
    help="PATH is a JSON merge patch (RFC 7396) that each station merges into its running "
    "config, instead of a whole config (needs --stations).",
)
def config_sign(
    path: str, key: str, stations: str | None, expires: str | None, patch: bool
) -> None:
    """Sign a config (or a merge patch) for the stations it is for and print
    the envelope that goes where a config goes (Tenta's `configuration`,
    ThingsBoard's `configuration` attribute). Run it on the operator's
    machine: the key never goes near a station."""
    from src.types.config import general_field_of
    from src.utils.update.admission import parse_json_object
    from src.utils.update.signatures import (
        SignatureError,
        envelope,
        sign_text,
        signed_document_text,
    )

    raw, error = parse_json_object(_read_config_file(path), path)
    if raw is None:
        _fail(str(error))
    if stations:
        targets = [s.strip() for s in stations.split(",") if s.strip()]
    else:
        identifier = general_field_of(raw, "system_identifier")
        if patch:
            _fail("a patch is for the stations you name: give --stations")
        if not isinstance(identifier, str):
            _fail(f"{path}: general.system_identifier is missing; name the stations (--stations)")
        targets = [identifier]
    expires_in = _parse_duration(expires) if expires else None
    try:
        text = signed_document_text(
            raw, targets, kind="patch" if patch else "config", expires_in_seconds=expires_in
        )
        signature = sign_text(text, key)
    except (SignatureError, ValueError) as e:
        _fail(f"cannot sign: {e}")
    click.echo(json.dumps(envelope(text, signature)))


@cli.group()
def trust() -> None:
    """The station's trust policy: who may change it remotely, and how far."""


@trust.command("show")
def trust_show() -> None:
    """Print what the trust policy means, then the policy itself."""
    from src.utils.update.trust import TrustError, load_policy, policy_path, summary

    try:
        policy = load_policy()
    except TrustError as e:
        _fail(str(e))
    for line in summary(policy):
        click.echo(line)
    if policy is not None:
        click.echo(f"\n{policy_path()}:")
        click.echo(json.dumps(policy.model_dump(mode="json"), indent=2))


@trust.command("set")
@click.option("--config-signers", type=click.Path(dir_okay=False, exists=True))
@click.option("--release-signers", type=click.Path(dir_okay=False, exists=True))
@click.option("--accept-unsigned-configs/--require-signed-configs", default=None)
@click.option("--accept-unsigned-releases/--require-signed-releases", default=None)
@click.option("--source", type=click.Choice(["git", "github", "gitlab"]))
@click.option("--repository", help="owner/name, or a git URL or local path.")
@click.option("--host", help="GitHub or GitLab host (optionally :port).")
@click.option("--broker-hosts", help='Comma-separated hosts a remote config may use ("*": any).')
@click.option("--allow-tls-off/--forbid-tls-off", default=None)
@click.option("--allow-downgrades/--forbid-downgrades", default=None)
def trust_set(
    config_signers: str | None,
    release_signers: str | None,
    accept_unsigned_configs: bool | None,
    accept_unsigned_releases: bool | None,
    source: str | None,
    repository: str | None,
    host: str | None,
    broker_hosts: str | None,
    allow_tls_off: bool | None,
    allow_downgrades: bool | None,
) -> None:
    """Create or change the trust policy (options left out keep their value).
    A local command: nothing that arrives over the network can do this."""
    import pydantic

    from src.utils.update.station_setup import SetupError, read_signers
    from src.utils.update.trust import (
        CONFIG_NAMESPACE,
        RELEASE_NAMESPACE,
        TrustError,
        TrustPolicy,
        has_signers,
        load_policy,
        release_signers_path,
        summary,
        write_trust,
    )
    from src.utils.update.trust import config_signers_path as signers_of_configs

    try:
        current = load_policy() or TrustPolicy()
        changes: dict[str, Any] = {
            "accept_unsigned_configs": accept_unsigned_configs,
            "accept_unsigned_releases": accept_unsigned_releases,
            "allow_tls_off": allow_tls_off,
            "allow_downgrades": allow_downgrades,
        }
        updated = current.model_dump()
        updated.update({k: v for k, v in changes.items() if v is not None})
        if broker_hosts is not None:
            updated["broker_hosts"] = [h.strip() for h in broker_hosts.split(",") if h.strip()]
        if source or repository or host:
            pinned = updated.get("release_source") or {}
            updated["release_source"] = {
                "source": source or pinned.get("source"),
                "repository": repository or pinned.get("repository"),
                "host": host if host is not None else pinned.get("host"),
            }
        policy = TrustPolicy.model_validate(updated)
        config_text = (
            read_signers(config_signers, CONFIG_NAMESPACE, "--config-signers", "")
            if config_signers
            else None
        )
        release_text = (
            read_signers(release_signers, RELEASE_NAMESPACE, "--release-signers", "")
            if release_signers
            else None
        )
    except pydantic.ValidationError as e:
        _fail(str(e).splitlines()[0] + ": " + "; ".join(x["msg"] for x in e.errors()))
    except (TrustError, SetupError) as e:
        _fail(str(e))
    if not policy.accept_unsigned_configs and not (
        config_text or has_signers(signers_of_configs())
    ):
        _fail("--config-signers FILE is required (or --accept-unsigned-configs, the opt-out)")
    if (
        policy.release_source is not None
        and not policy.accept_unsigned_releases
        and not (release_text or has_signers(release_signers_path()))
    ):
        _fail("--release-signers FILE is required (or --accept-unsigned-releases, the opt-out)")
    write_trust(policy, config_text, release_text)
    for line in summary(policy):
        click.echo(line)


@cli.group()
def update() -> None:
    """Software updates: where the station stands."""


@update.command("status")
def update_status() -> None:
    """Print the update journal and the update in progress, as JSON."""
    from src.utils.state_interface import StateInterface
    from src.utils.update.journal import load_journal
    from src.utils.update.paths import journal_path

    state = StateInterface.load()
    in_progress = state.update_in_progress
    click.echo(
        json.dumps(
            {
                "running_version": constants.VERSION.root,
                "journal": load_journal().model_dump(),
                "journal_path": journal_path(),
                "in_progress": in_progress.model_dump() if in_progress else None,
                "config_outcomes": [o.model_dump() for o in state.config_outcomes],
            },
            indent=2,
        )
    )


@cli.command()
def rollback() -> None:
    """Go back to the previous version by hand: during a trial the guard
    rolls the candidate back; otherwise the station is stopped, the pointer
    goes back to the previous version (this one is marked bad) and the
    station is started again if it ran."""
    from src.utils.update import (
        RollbackError,
        previous_version,
        request_rollback,
        roll_back_by_hand,
    )
    from src.utils.update.paths import cli_pointer_path

    asked = request_rollback()
    if asked is not None:
        click.echo(asked)
        return
    if previous_version() is None:
        _fail("there is no previous version to go back to")
    revision = _load_config_or_fail().general.config_revision
    was_running = mainloop_toggle.is_running()
    if was_running:
        mainloop_toggle.stop_mainloop(timeout=_stop_timeout(None))
    try:
        previous = roll_back_by_hand(revision)
    except RollbackError as e:
        _fail(str(e))
    click.echo(f"the pointer names {previous} again; {constants.VERSION.root} is marked bad")
    if was_running:
        pointer = cli_pointer_path()
        result = subprocess.run([pointer, "start"], check=False)
        if result.returncode != 0:
            _fail(f"{pointer} start failed")


@cli.command()
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Install here.")
@click.option(
    "--source", required=True, type=click.Choice(["git", "github", "gitlab"]), help="Where from."
)
@click.option("--repository", required=True, help="owner/name, or a git URL or local path.")
@click.option("--version", "version", required=True, help="The version to install (tag v<V>).")
@click.option("--host", help="GitHub or GitLab host (optionally :port).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--config-signers",
    type=click.Path(dir_okay=False, exists=True),
    help="OpenSSH public keys (or an allowed_signers file) whose signatures make a remote "
    "config acceptable.",
)
@click.option(
    "--release-signers",
    type=click.Path(dir_okay=False, exists=True),
    help="OpenSSH public keys (or an allowed_signers file) that sign release tags.",
)
@click.option(
    "--accept-unsigned-configs",
    is_flag=True,
    help="Opt out of config signatures: anyone who can publish on the config topic can "
    "change this station.",
)
@click.option("--accept-unsigned-releases", is_flag=True, help="Opt out of release tag signatures.")
@click.option(
    "--broker-hosts",
    help='Hosts a remote config may point a backend at (default: those of --config; "*": any).',
)
@click.option("--allow-tls-off", is_flag=True, help="A remote config may turn TLS off.")
@click.option("--allow-downgrades", is_flag=True, help="A remote config may ask for older.")
def setup(
    root: str,
    source: str,
    repository: str,
    version: str,
    host: str | None,
    config_path: str | None,
    config_signers: str | None,
    release_signers: str | None,
    accept_unsigned_configs: bool,
    accept_unsigned_releases: bool,
    broker_hosts: str | None,
    allow_tls_off: bool,
    allow_downgrades: bool,
) -> None:
    """Install a first version into ROOT: the trust policy, <root>/<version>/
    (its tag's signature verified) with its own venv, the config, and the CLI
    pointer <root>/ivy-cli.sh. A token for a private repository comes from the
    environment variable IVY_ACCESS_TOKEN (never an argument, which `ps`
    would show)."""
    root = os.path.abspath(os.path.expanduser(root))
    if constants.ROOT_DIR != root:
        # every path of the setup derives from the root: run again in a
        # process whose constants point at it
        os.execve(  # noqa: S606 - this very CLI, no shell
            sys.executable,
            [sys.executable, os.path.join(constants.PROJECT_DIR, "cli.py"), *sys.argv[1:]],
            {**os.environ, "IVY_ROOT_DIR": root},
        )
    from src.utils.update import SetupError, set_up_station
    from src.utils.update.station_setup import SetupRequest
    from src.utils.update.trust import summary

    request = SetupRequest(
        source=source,
        repository=repository,
        version=version,
        host=host,
        config_path=os.path.abspath(config_path) if config_path else None,
        access_token=os.environ.get("IVY_ACCESS_TOKEN") or None,
        config_signers_path=config_signers,
        release_signers_path=release_signers,
        accept_unsigned_configs=accept_unsigned_configs,
        accept_unsigned_releases=accept_unsigned_releases,
        broker_hosts=(
            [h.strip() for h in broker_hosts.split(",") if h.strip()] if broker_hosts else None
        ),
        allow_tls_off=allow_tls_off,
        allow_downgrades=allow_downgrades,
    )
    try:
        pointer = set_up_station(request, log_progress=click.echo)
    except SetupError as e:
        _fail(f"setup failed: {e}")
    from src.utils.update.trust import load_policy

    click.echo(
        "\n".join(
            [
                f"installed Ivy {version} in {root}",
                *(f"trust: {line}" for line in summary(load_policy())),
                "next:",
                f"  start it now:        {shlex.quote(pointer)} start",
                f"  at boot (systemd):   {shlex.quote(pointer)} boot systemd "
                "| sudo tee /etc/systemd/system/ivy.service && "
                "sudo systemctl enable --now ivy",
                f"  or at boot (cron):   ({{ crontab -l; {shlex.quote(pointer)} boot cron; }}) "
                "| crontab -",
            ]
        )
    )


cli.add_command(fleet)


if __name__ == "__main__":
    cli()
