#!/usr/bin/env python3
"""The operator's command line, installed as the console script `ivy`.

Exit codes: 0 ok, 1 refused or not running, 2 usage error.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import sys
import time
from typing import Any, NoReturn

import click

from src import constants
from src import procedures as procedure_modules
from src.types import Config, ConfigError, State
from src.types.config import secret_values
from src.utils import mainloop_toggle
from src.utils.lifecycle_manager import backend_teardown_seconds
from src.utils.logger import MIN_MASKED_SECRET_LENGTH
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface


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


@cli.command()
def start() -> None:
    """Start the main loop in the background; return once it is up."""
    for problem in _config_warnings(_load_config_or_fail()):
        click.echo(f"warning: {problem}", err=True)
    try:
        pid = mainloop_toggle.start_mainloop()
    except mainloop_toggle.MainloopToggleError as e:
        _fail(str(e))
    click.echo(f"Ivy started (main loop pid {pid})")


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


def _collect_status() -> dict[str, Any]:
    state: State = StateInterface.load()
    now = time.time()
    pid = mainloop_toggle.get_mainloop_pid()
    try:
        config = Config.load()
        config_status: dict[str, Any] = {
            "valid": True,
            "revision": config.general.config_revision,
            "software_version": config.general.software_version.root,
            "system_identifier": config.general.system_identifier,
            "backend": config.backend.provider if config.backend else None,
        }
    except ConfigError as e:
        config_status = {"valid": False, "error": str(e)}
    agent = MessagingAgent()
    try:
        queue = {
            "depth": agent.get_queue_depth(),
            "oldest_age_seconds": agent.get_oldest_message_age(now),
            "dropped": agent.get_dropped_count(),
            "poisoned": agent.get_poisoned_count(),
        }
    finally:
        agent.close()
    return {
        "running": pid is not None,
        "version": constants.VERSION.root,
        "mainloop": {
            "pid": pid,
            "uptime_seconds": (now - state.mainloop.started_at)
            if (pid and state.mainloop.started_at)
            else None,
            "heartbeat_age_seconds": (now - state.mainloop.last_heartbeat)
            if (pid and state.mainloop.last_heartbeat)
            else None,
        },
        "config": config_status,
        "backend_connection": (
            state.backend_connection.model_dump()
            if (pid is not None and state.backend_connection is not None)
            else None
        ),
        "queue": queue,
        "processes": {
            name: p.model_dump() | ({"alive": False, "pid": None} if pid is None else {})
            for name, p in state.processes.items()
        },
    }


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(as_json: bool) -> None:
    """Show the main loop, each procedure and backend, the queue and the config."""
    s = _collect_status()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    if s["running"]:
        m = s["mainloop"]
        click.echo(
            f"Ivy {s['version']}: running (main loop pid {m['pid']}, "
            f"up {_age(m['uptime_seconds'])}, "
            f"last heartbeat {_age(m['heartbeat_age_seconds'])} ago)"
        )
    else:
        click.echo(f"Ivy {s['version']}: not running")
    c = s["config"]
    if c["valid"]:
        click.echo(
            f"config:  revision {c['revision']}, software version {c['software_version']}, "
            f"station {c['system_identifier']}, backend {c['backend'] or 'none (local queue only)'}"
        )
    else:
        click.echo("config:  INVALID (see `ivy config check`)")
    b = s["backend_connection"]
    if b is not None:
        acknowledged = (
            f", last acknowledgment {_age(time.time() - b['last_acknowledgment'])} ago"
            if b["last_acknowledgment"]
            else ""
        )
        click.echo(
            f"broker:  {'connected' if b['connected'] else 'NOT CONNECTED'} "
            f"({b['detail']}, since {_age(time.time() - b['since'])}){acknowledged}"
        )
    q = s["queue"]
    click.echo(
        f"queue:   {q['depth']} message(s) unsent, oldest {_age(q['oldest_age_seconds'])} old, "
        f"{q['dropped']} dropped by the size cap, {q['poisoned']} poison row(s)"
    )
    if s["processes"]:
        click.echo(f"\n  {'PROCESS':<20}{'ALIVE':<7}{'PID':<9}{'RESTARTS':<10}LAST ERROR")
        for name, p in s["processes"].items():
            click.echo(
                f"  {name:<20}{'yes' if p['alive'] else 'no':<7}{p['pid'] or '-'!s:<9}"
                f"{p['restarts']:<10}{p['last_error'] or '-'}"
            )


@cli.command()
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines.")
def logs(lines: int) -> None:
    """Print the last lines of today's log file (UTC date)."""
    from tum_esm_utils.files import read_last_n_lines

    from src.utils.functions import current_log_file_path

    path = current_log_file_path()
    if not os.path.isfile(path):
        _fail(f"no log file for today yet ({path})")
    for line in read_last_n_lines(path, lines, ignore_trailing_whitespace=True):
        click.echo(line)


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
    """Broken procedure modules, procedures that have no config section (they
    do not run), and secrets too short to be masked in log lines."""
    problems = list(procedure_modules.PROBLEMS.values())
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


@cli.command()
@click.argument("kind", type=click.Choice(["systemd", "cron"]))
def boot(kind: str) -> None:
    """Print a systemd unit or a crontab line that starts Ivy at boot."""
    python = shlex.quote(sys.executable)
    run_py = shlex.quote(os.path.join(constants.PROJECT_DIR, "run.py"))
    cli_py = shlex.quote(os.path.join(constants.PROJECT_DIR, "cli.py"))
    if kind == "cron":
        click.echo(f"@reboot {python} {cli_py} start >/dev/null 2>&1")
        return
    try:
        config: Config | None = Config.load()
    except ConfigError:
        config = None
    click.echo(
        "\n".join(
            [
                "# /etc/systemd/system/ivy.service",
                "[Unit]",
                "Description=Ivy data-acquisition supervisor",
                "Wants=network-online.target",
                "After=network-online.target",
                "",
                "[Service]",
                "Type=simple",
                f"User={getpass.getuser()}",
                f"WorkingDirectory={constants.PROJECT_DIR}",
                f"Environment=IVY_ROOT_DIR={constants.ROOT_DIR}",
                f"Environment=IVY_DATA_DIR={constants.DATA_DIR}",
                f"ExecStart={python} {run_py}",
                "# SIGTERM to the main loop only; it stops its children in order",
                "KillMode=mixed",
                f"TimeoutStopSec={int(_stop_timeout(config))}",
                "Restart=always",
                "RestartSec=5",
                "",
                "[Install]",
                "WantedBy=multi-user.target",
            ]
        )
    )


if __name__ == "__main__":
    cli()
