"""The service commands: `sluice up`, `sluice down`, `sluice report`, `sluice systemd-units`.

Registered on the main typer app by pipeline/cli/app.py (register). Every input is checked
before anything is stopped or written (a bad expected-blocks file, a --since that is not a
time, a summary file that cannot be written: one line, exit 2, the pipeline untouched).
Notes go to stderr; stdout carries the report and, in GitHub Actions, the `::error::`
annotations of the gate.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer

from .shared import one_line_errors
from ..errors import ExitCode, SluiceError
from ..topology import STAGES

FORMATS = ("markdown", "json", "html")
SUFFIX_FORMATS = {".md": "markdown", ".markdown": "markdown", ".json": "json", ".html": "html",
                  ".htm": "html"}


class BadInput(SluiceError):
    exit_code = ExitCode.BAD_INPUT


def _note(text: str) -> None:
    typer.echo(text, err=True)


def _appendable(path: Path, what: str) -> Path:
    """Open for appending (creating it) and close: a file we cannot write stops us early."""
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise BadInput(f"{what} {path}: cannot write: {err.strerror}") from None
    return path


# ---------------------------------------------------------------- up


def up(
    log: Path | None = typer.Option(None, help="honcho's output (default: "
                                       "$SLUICE_RUN_DIR/sluice.log)"),
    pid_file: Path | None = typer.Option(None, help="honcho's pid (default: "
                                            "$SLUICE_RUN_DIR/sluice.pid)"),
    env_file: Path | None = typer.Option(None, help="settings file in .env form, read "
                                            "on top of the environment (default: none)"),
    timeout: float = typer.Option(120.0, help="seconds to wait for the pipeline to be on"),
) -> None:
    """Start the pipeline in the background and wait until it is fully on.

    Exits 0 once every stage is up and every requested protection layer is on; otherwise
    stops what it started, removes what was attached and says why, with the log's tail.

    Example: SLUICE_MODE=enforce sluice up --timeout 60"""
    from ..service import up as start

    with one_line_errors():
        record, posture = start(os.environ, log=log, pid_file=pid_file, env_file=env_file,
                                timeout=timeout, cwd=Path.cwd())
    classifier = posture.layers["classifier"]
    typer.echo(f"sluice is up: {classifier.detail}; pid {record.pid}, log {record.log}")


# ---------------------------------------------------------------- down and report: the gate


def _gate_inputs(settings, fail_on_block: bool | None, expected: Path | None):
    gate = settings.fail_on_block if fail_on_block is None else fail_on_block
    path = expected or settings.expected_blocks
    from ..report.gate import read_expected

    return gate, read_expected(path) if path else []


def _apply_gate(report, entries, ci_env) -> int:
    """Print what nobody expected; the number of such blocks."""
    from ..report.gate import annotation, unexpected

    findings = unexpected(report.facts.blocked, report.facts.refused, entries,
                          report.blocked_word)
    in_actions = ci_env.get("GITHUB_ACTIONS", "").lower() == "true"
    for finding in findings:
        if in_actions:
            typer.echo(annotation(finding))
        else:
            _note(f"sluice: unexpected block: {finding.message}")
    return len(findings)


def _render(report, output_format: str) -> str:
    from ..report.html import as_html
    from ..report.render import as_json, as_markdown

    return {"markdown": as_markdown, "json": as_json, "html": as_html}[output_format](report)


def _write_report(report, path: Path) -> None:
    output_format = SUFFIX_FORMATS.get(path.suffix.lower(), "markdown")
    try:
        path.write_text(_render(report, output_format))
    except OSError as err:
        raise SluiceError(f"cannot write the report to {path}: {err.strerror}") from None


def _append(path: Path, text: str, what: str) -> None:
    try:
        with open(path, "a") as out:
            out.write(text)
    except OSError as err:
        raise SluiceError(f"cannot append to {what} {path}: {err.strerror}") from None


def down(
    keep_filter: bool = typer.Option(False, "--keep-filter", help="enforce mode: leave the "
                                     "filter and maps in place (fail closed) after the stop"),
    fail_on_block: bool | None = typer.Option(
        None, "--fail-on-block/--no-fail-on-block", envvar="SLUICE_FAIL_ON_BLOCK",
        help="exit 8 when a destination was blocked (would be, in audit mode) that "
        "--expected does not list (default: no)"),
    expected: Path | None = typer.Option(None, envvar="SLUICE_EXPECTED_BLOCKS",
                                         help="expected-blocks file (default: none)"),
    report_file: Path | None = typer.Option(None, "--report", help="also write the run's "
                                               "report here (.html, .json or .md)"),
    timeout: float = typer.Option(30.0, help="seconds to wait for the stages to stop"),
) -> None:
    """Stop what `sluice up` started, report the run and apply the gate.

    Waits for a clean stop, detaches (in enforce mode unless --keep-filter), appends the
    markdown report to $GITHUB_STEP_SUMMARY when it is set.

    Example: sluice down --fail-on-block --expected expected-blocks.txt --report run.html"""
    from ..journal import unstored_records
    from ..posture import read_posture
    from ..report.gate import GateFailed
    from ..report.make import make_report
    from ..service import detach_leftovers, down as stop, recorded_settings

    with one_line_errors():
        settings, record = recorded_settings(os.environ)
        gate, entries = _gate_inputs(settings, fail_on_block, expected)
        summary = settings.ci_env.get("GITHUB_STEP_SUMMARY")
        outputs = settings.ci_env.get("GITHUB_OUTPUT")
        for path, what in ((summary, "GITHUB_STEP_SUMMARY"), (outputs, "GITHUB_OUTPUT"),
                           (report_file, "--report")):
            if path:
                _appendable(Path(path), what)
        if record is None:
            removed = [] if keep_filter else detach_leftovers(settings)
            _note("sluice is not running" + (f"; removed {'; '.join(removed)}" if removed
                                             else ""))
            return
        posture = read_posture(settings, STAGES) if record.running() else None
        stopped = stop(settings, record, keep_filter=keep_filter, timeout=timeout)
        _note(f"sluice stopped (pid {record.pid}, {record.mode} mode)"
              + (f"; removed {'; '.join(stopped.removed)}" if stopped.removed else "")
              + ("; the filter stays in place (--keep-filter)" if keep_filter
                 and record.mode == "enforce" else ""))
        if unstored := unstored_records(settings.journal_dir):
            # Records in flight at the stop (a backlog, the flows' last packets) wait for
            # the next start; on a runner thrown away after the job there is none.
            _note(f"sluice: {unstored} record(s) captured before the stop are not stored "
                  f"yet, so this report does not show them: they wait in "
                  f"{settings.journal_dir} for the next start")
        report = make_report(settings, host=settings.host_name, mode=record.mode,
                             since_ns=record.started_ns, now_ns=time.time_ns(),
                             posture=posture.as_json() if posture else None)
        if summary:
            _append(Path(summary), _render(report, "markdown"), "GITHUB_STEP_SUMMARY")
        if report_file:
            _write_report(report, report_file)
        _note(f"report: {report.headline()}")
        unexpected_count = _apply_gate(report, entries, settings.ci_env) if gate else 0
        if outputs:
            _append(Path(outputs), f"blocked={len(report.facts.blocked)}\n"
                    f"dns_refused={len(report.facts.refused)}\nunexpected={unexpected_count}\n",
                    "GITHUB_OUTPUT")
        problems = stopped.problems() + (posture.problems() if posture else [])
        for line in problems:
            _note(f"sluice: {line}")
        if problems:
            raise typer.Exit(ExitCode.STAGE_FAILED)
        if unexpected_count:
            raise GateFailed(f"{unexpected_count} unexpected block(s): failing "
                             "(--fail-on-block)")


def report(
    since: str | None = typer.Option(None, help="only records at or after this RFC 3339 "
                                        "time or age (24h, 7d); default: all"),
    output_format: str = typer.Option("markdown", "--format", "-f",
                                      help="markdown, json or html"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write it here "
                                          "instead of stdout"),
    # No envvar: after `sluice up` these come from the settings it recorded (service.py).
    host: str | None = typer.Option(None, help="the host whose records to report "
                                       "(default: SLUICE_HOST as `sluice up` recorded it, "
                                       "else this machine's name)"),
    db: str | None = typer.Option(None, help="database URL (default: SLUICE_DB as "
                                     "`sluice up` recorded it)"),
    fail_on_block: bool | None = typer.Option(
        None, "--fail-on-block/--no-fail-on-block", envvar="SLUICE_FAIL_ON_BLOCK",
        help="exit 8 when a destination was blocked that --expected does not list "
        "(default: no)"),
    expected: Path | None = typer.Option(None, envvar="SLUICE_EXPECTED_BLOCKS",
                                         help="expected-blocks file (default: none)"),
) -> None:
    """Report what was blocked, late-allowed and refused, with the posture.

    Ends with the allowlist change that would let the blocked destinations through.

    Example: sluice report --since 24h --format html -o report.html"""
    from ..posture import read_posture
    from ..report.make import make_report
    from ..service import recorded_settings
    from ..audit.suggest import parse_since

    with one_line_errors():
        if output_format not in FORMATS:
            raise BadInput(f"--format {output_format!r}: use {', '.join(FORMATS)}")
        now = time.time_ns()
        since_ns = parse_since(since, now) if since else None
        settings, record = recorded_settings(os.environ)
        if db:
            settings = settings.replace(db=db)
        gate, entries = _gate_inputs(settings, fail_on_block, expected)
        if output:
            _appendable(output, "--output")
        posture = read_posture(settings, STAGES)
        running = any(s.state != "down" for s in posture.stages.values())
        mode = record.mode if record else settings.mode
        result = make_report(settings, host=host or settings.host_name, mode=mode,
                             since_ns=since_ns, now_ns=now,
                             posture=posture.as_json() if running else None)
        text = _render(result, output_format)
        if output:
            output.write_text(text)
        else:
            sys.stdout.write(text)
        if gate and _apply_gate(result, entries, settings.ci_env):
            raise typer.Exit(ExitCode.UNEXPECTED_BLOCK)


# ---------------------------------------------------------------- systemd


def systemd_units(
    directory: Path = typer.Argument(..., help="where to write the unit files "
                                     "(/etc/systemd/system on a server)"),
    env_file: Path = typer.Option(Path("/etc/sluice/sluice.env"), help="the settings file "
                                  "every unit reads at start (.env form, root-only)"),
    user: str = typer.Option("root", help="the user the stages run as"),
) -> None:
    """Write systemd units for a server: sluice.target and one service per stage.

    Example: sluice systemd-units /etc/systemd/system --env-file /etc/sluice/sluice.env"""
    from ..service import sluice_executable, systemd_units as units

    with one_line_errors():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, text in units(str(Path(sluice_executable()).absolute()), env_file,
                                    user).items():
                (directory / name).write_text(text)
                typer.echo(directory / name)
        except OSError as err:
            raise SluiceError(f"cannot write units to {directory}: {err.strerror}") from None
    _note(f"next: put the settings in {env_file} (chmod 600), then `systemctl daemon-reload "
          "&& systemctl enable --now sluice.target`")


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("report")(report)
    app.command("systemd-units")(systemd_units)
