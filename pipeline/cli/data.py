"""The data commands: replay, query, import, suggest, prune and browse.

Registered on the main typer app by pipeline/cli/app.py (register). Errors are one line on
stderr with the error's exit code; results go to stdout, progress and notes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                           TextColumn, TimeRemainingColumn)
from rich.text import Text

from .shared import one_line_errors, settings_from_env

DB_HELP = "database URL (default: the built-in SLUICE_DB)"


# ---------------------------------------------------------------- replay

class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} events/s")


@contextlib.contextmanager
def _progress_bar(total: int) -> Iterator:
    """A progress callback drawing events, events/s and time left on stderr."""
    columns = (TextColumn("replay"), BarColumn(), MofNCompleteColumn(), _Rate(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("replay", total=total)
        yield lambda done: progress.update(task, completed=done)


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C ends the replay between two batches, and the summary is still printed."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def replay(
    files: list[Path] = typer.Argument(..., help="recording files; rotated ones in any order"),
    pace: str = typer.Option("recorded", help="live: recorded, max, or a speed factor (10 = "
                             "ten times the recorded pace)"),
    offline: bool = typer.Option(False, "--offline", help="judge in this process under "
                                 "--policy and store in --db; no pipeline or kernel needed"),
    policy: Path | None = typer.Option(None, help="offline: the policy file to judge by"),
    db: str | None = typer.Option(None, help="offline: database URL for the outcomes"),
    mode: str | None = typer.Option(None, help="offline: audit or enforce (default: the "
                                       "recording's)"),
) -> None:
    """Replay a SLUICE_RECORD recording into the running pipeline, or --offline under a
    policy.

    Example: sluice replay --offline --policy new.json --db sqlite:///whatif.db week.rec"""
    from ..recording import in_replay_order
    from ..replay import ReplayError, count_records, parse_pace, replay_live, replay_offline

    with one_line_errors():
        settings = settings_from_env()
        if offline and (policy is None or db is None):
            raise ReplayError("--offline needs --policy FILE and --db URL (keep what-if rows "
                              "apart from the live store)")
        what_if = (policy, db) if offline and policy is not None and db is not None else None
        if mode not in (None, "audit", "enforce"):
            raise ReplayError(f"--mode {mode!r}: use audit or enforce")
        factor = parse_pace(pace)
        ordered = in_replay_order(files)
        with _progress_bar(count_records(ordered)) as progress, _stop_on_interrupt() as stop:
            if what_if is not None:
                summary = replay_offline(ordered, settings, *what_if, mode, progress, stop)
            else:
                summary = replay_live(ordered, settings.run_dir, factor, progress, stop)
        for line in summary.lines():
            typer.echo(line)
        if stop.is_set():
            typer.echo("stopped early (Ctrl-C)", err=True)


# ---------------------------------------------------------------- query

def query(
    sql: str = typer.Argument(..., help="one SELECT statement; the views are in the README"),
    db: str | None = typer.Option(None, envvar="SLUICE_DB", help=DB_HELP),
    output_format: str = typer.Option("table", "--format", "-f",
                                      help="table, csv, json or ndjson"),
    since: str | None = typer.Option(None, help="bound to :since in the SQL (RFC 3339 time, "
                                        "date, or an age such as 24h or 7d)"),
    until: str | None = typer.Option(None, help="bound to :until in the SQL (as --since)"),
) -> None:
    """Run one read-only SQL query on the audit store; anything that writes is refused.

    Example: sluice query "SELECT * FROM blocked_destinations" --format csv"""
    from ..audit.query import answer

    with one_line_errors():
        answer(sql, db=db or settings_from_env().db, out=sys.stdout, now_ns=time.time_ns(),
               output_format=output_format, since=since, until=until)


# ---------------------------------------------------------------- import

def import_ndjson(
    file: Path = typer.Argument(..., help="a cargowall or sluice NDJSON audit log"),
    db: str | None = typer.Option(None, envvar="SLUICE_DB", help=DB_HELP),
    host: str | None = typer.Option(None, envvar="SLUICE_HOST", help="host name for lines "
                                    "without one (default: this machine's name)"),
) -> None:
    """Load an NDJSON audit log into the store; importing it again adds nothing. Every
    valid line is stored; each rejected one is reported on stderr as FILE:LINE: reason.

    Example: sluice import /var/log/cargowall/audit.json --host runner-7"""
    from ..audit.importer import import_file

    def rejected(line: int, reason: str) -> None:
        typer.echo(f"{file}:{line}: {reason}", err=True)

    with one_line_errors():
        settings = settings_from_env()
        report = import_file(file, db or settings.db, host or settings.host_name, rejected,
                             settings.gid)
        for line in report.lines_out():
            typer.echo(line)


# ---------------------------------------------------------------- suggest

def suggest(
    since: str | None = typer.Option(None, help="only rows at or after this RFC 3339 time "
                                        "or age (24h, 7d); default: all"),
    db: str | None = typer.Option(None, envvar="SLUICE_DB", help=DB_HELP),
    host: str = typer.Option("", help="only this host's rows (default: every host)"),
    group_siblings: int = typer.Option(2, min=0, help="names one label below a parent that "
                                       "become one rule; 0 = never group"),
    output: Path | None = typer.Option(None, "--output", "-o",
                                          help="write the policy here instead of stdout"),
) -> None:
    """Draft a policy JSON that would allow what audit-mode runs saw.

    Example: sluice suggest --since 7d -o policy.json"""
    from ..audit.suggest import draft_policy, parse_since, seen_in

    with one_line_errors():
        since_ns = parse_since(since, time.time_ns()) if since else 0
        seen, left_out = seen_in(db or settings_from_env().db, since_ns, host)
        text = json.dumps(draft_policy(seen, group_siblings), indent=2) + "\n"
        if output:
            output.write_text(text)
        else:
            typer.echo(text, nl=False)
        typer.echo(f"sluice suggest: {len(seen)} destination(s) seen", err=True)
        for line in left_out:
            typer.echo(f"sluice suggest: not drafted: {line}", err=True)


# ---------------------------------------------------------------- prune and browse

def prune(
    before: str = typer.Option(..., help="delete audit rows older than this date (UTC "
                               "midnight) or RFC 3339 time"),
    db: str | None = typer.Option(None, envvar="SLUICE_DB", help=DB_HELP),
) -> None:
    """Delete old audit rows in small batches; the daily rollups keep counting them.

    Example: sluice prune --before 2026-01-01"""
    from ..audit.store import AuditStore
    from ..audit.timestamps import parse_moment, sql_timestamp

    with one_line_errors():
        cutoff = sql_timestamp(parse_moment(before, "--before"))
        store = AuditStore(db or settings_from_env().db)
        try:
            store.migrate()
            pruned = store.prune(cutoff)
        finally:
            store.close()
        typer.echo(f"pruned {pruned.rows} audit row(s) and {pruned.minutes} timeline minute(s) "
                   f"older than {cutoff}; the daily rollups keep counting them")


def browse(
    db: str | None = typer.Option(None, envvar="SLUICE_DB",
                                  help="SQLite store URL (default: the built-in SLUICE_DB)"),
    port: int = typer.Option(8001, min=0, max=65535, help="port on 127.0.0.1"),
) -> None:
    """Open the store read-only in Datasette on 127.0.0.1, with the views described.

    Example: sluice browse --port 8001"""
    from ..audit.browse import serve

    with one_line_errors():
        serve(db or settings_from_env().db, port)


def register(app: typer.Typer) -> None:
    app.command("replay")(replay)
    app.command("query")(query)
    app.command("import")(import_ndjson)
    app.command("suggest")(suggest)
    app.command("prune")(prune)
    app.command("browse")(browse)
