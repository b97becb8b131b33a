"""The `sluice` command: run a stage, wait for the pipeline, detach, check the machine."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from .. import __version__
from .data import register as register_data_commands
from .service import register as register_service_commands
from .shared import fail, one_line_errors, settings_from_env
from ..errors import ExitCode, SluiceError, report
from ..private import UMASK
from ..settings import SETTINGS, shown
from ..topology import STAGES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="sluice: an egress firewall for CI runners and servers.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sluice {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Each stage is one process; `honcho start` runs them all from the Procfile."""


@app.command()
def run(stage: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)}")) -> None:
    """Run one pipeline stage in the foreground until SIGTERM/SIGINT.

    Example: sluice run policy"""
    if stage not in STAGES:
        fail(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}", ExitCode.BAD_INPUT)
    from ..stages import run_named

    raise typer.Exit(run_named(stage))


@app.command("wait-ready")
def wait_ready(
    timeout: float = typer.Option(60.0, help="seconds to wait before giving up"),
    stages: str | None = typer.Option(None, help="comma-separated stages (default: all)"),
) -> None:
    """Exit 0 once every stage is up and every requested protection layer is on.

    Example: sluice wait-ready --timeout 30 --stages capture,policy"""
    from ..service import wait_until_ready

    settings = settings_from_env()
    wanted = stages.split(",") if stages else list(STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        fail(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}",
             ExitCode.BAD_INPUT)
    with one_line_errors():
        wait_until_ready(settings, wanted, timeout)
    typer.echo(f"ready: {', '.join(wanted)}")


@app.command()
def detach() -> None:
    """Remove this instance's filter, cgroup hooks and pinned maps (also with no stage
    running).

    Example: SLUICE_BPF_DIR=/sys/fs/bpf/sluice sluice detach"""
    from ..kernel.loader import detach_instance

    settings = settings_from_env()
    removed = detach_instance(settings)
    typer.echo("removed: " + "; ".join(removed) if removed else "nothing attached")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Show every protection layer and every stage: state, detail, latest counters; then
    in = out from the kernel to the store (read, journaled, sent, stored, pending, lost and
    why). Exits 0 when every requested layer is on, 1 otherwise.

    Example: sluice status --json"""
    from ..posture import read_posture, table

    posture = read_posture(settings_from_env(), STAGES)
    if as_json:
        typer.echo(json.dumps(posture.as_json(), indent=2))
    else:
        typer.echo(table(posture), nl=False)
    raise typer.Exit(ExitCode.FAILED if posture.problems() else ExitCode.OK)


@app.command()
def doctor() -> None:
    """Check every kernel and system requirement; one line each, with how to fix.

    Example: sudo sluice doctor"""
    from ..kernel.doctor import run_checks

    settings = settings_from_env()
    problems = 0
    for check in run_checks(settings):
        typer.echo(check.line())
        problems += not check.ok
    raise typer.Exit(ExitCode.FAILED if problems else ExitCode.OK)


@app.command("print-bpf")
def print_bpf() -> None:
    """Print the BPF source and flags capture would load (needs no root).

    Example: SLUICE_RINGBUF_PAGES=256 sluice print-bpf | less"""
    from ..kernel.loader import printable_source

    typer.echo(printable_source(settings_from_env()))


@app.command()
def settings() -> None:
    """List every SLUICE_* setting with its value, default and meaning.

    Example: SLUICE_MODE=enforce sluice settings"""
    current = settings_from_env()
    for setting in SETTINGS:
        value = getattr(current, setting.name)
        if isinstance(value, str):
            value = shown(setting, value)
        typer.echo(f"{setting.variable}={'' if value is None else value}  "
                   f"# {setting.help} (default {setting.default!r})")


policy_app = typer.Typer(no_args_is_help=True, help="Check a policy and explain its verdicts.")
app.add_typer(policy_app, name="policy")


def _load(file: Path | None):
    from ..policy.load import InvalidPolicy, load_policy, load_policy_file

    try:
        return load_policy_file(file) if file else load_policy(settings_from_env())
    except InvalidPolicy as err:
        for line in err.lines:
            typer.echo(line, err=True)
        raise typer.Exit(ExitCode.FAILED) from None


@policy_app.command("check")
def policy_check(file: Path | None = typer.Argument(
        None, help="policy JSON file (default: SLUICE_POLICY or the SLUICE_* environment form)"),
) -> None:
    """Validate a policy and print its resolved rules; exit 1 with every problem otherwise.

    Example: sluice policy check /etc/sluice/policy.json"""
    from ..policy.explain import render_table

    typer.echo(render_table(_load(file)), nl=False)


@policy_app.command("explain")
def policy_explain(
    target: str = typer.Argument(..., help="a hostname or an IP address"),
    port: int | None = typer.Option(None, min=0, max=65535, help="destination port"),
    protocol: str | None = typer.Option(None, help="tcp, udp or icmp"),
    policy: Path | None = typer.Option(None, "--policy", help="policy file to judge by"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Say which rule decides NAME_OR_IP (for a port and protocol when given) and why.

    Example: sluice policy explain api.github.com --port 443 --protocol tcp"""
    from ..policy.explain import explain

    try:
        result = explain(_load(policy), target, port, protocol)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_INPUT)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{result['target']}: {result['decision']}")
    for side in ("allow", "deny"):
        if result[f"{side}_rule"]:
            ports = ", ".join(f"{p['port']}/{p['protocol']}" for p in result[f"{side}_ports"])
            typer.echo(f"  {side} rule: {result[f'{side}_rule']} ({ports or 'all ports'})")
    typer.echo(f"  why: {result['reason']}")


register_data_commands(app)  # replay, query, import, suggest: pipeline/cli/data.py
register_service_commands(app)  # up, down, report, systemd-units: pipeline/cli/service.py


def main() -> None:
    os.umask(UMASK)  # what sluice creates is private; pipeline/private.py sets exact modes
    try:
        app(standalone_mode=True)
    except SluiceError as err:
        sys.exit(report(err))


if __name__ == "__main__":
    main()
