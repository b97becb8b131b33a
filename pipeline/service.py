"""`sluice up` / `sluice down`: the pipeline as a background service, and waiting for it.

up starts `honcho start` on a Procfile written from the topology, detached from the caller,
with its output in a log file and its pid in a pid file; it waits until every stage is ready
and every requested protection layer is on (pipeline/posture.py). If that does not happen it
stops what it started, removes everything it attached, and says why with the log's last
lines. What up started is written to <run_dir>/sluice.json (the service record), so down
finds it from another shell: down stops honcho (which stops the stages), waits for every
process to be gone, and in enforce mode detaches unless told to keep the filter.

Both are idempotent: up refuses a second start with one line, down with nothing running
says so and exits 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .errors import ExitCode, SluiceError
from .hostfiles import process_start
from .loop import prepare_run_dir, write_atomic
from .posture import LAYERS, Posture, pid_alive, read_posture
from .settings import Settings
from .topology import STAGES

WAIT_STEP_S = 0.1
STOP_WAIT_S = 30.0     # honcho gives its stages 5 s, then kills them; this is the outer bound
LOG_TAIL_LINES = 40  # the other stages' stop lines alone take about three each
# Never written to the run record: tokens, headers, and a collector URL's credentials.
SECRET_VARIABLES = ("SLUICE_NOTIFY_TOKEN", "SLUICE_OTLP_HEADERS", "SLUICE_OTLP_ENDPOINT")
# Chosen per run by whoever stops the pipeline, never taken from the one who started it.
PER_STOP_VARIABLES = ("SLUICE_FAIL_ON_BLOCK", "SLUICE_EXPECTED_BLOCKS")


class NotReady(SluiceError):
    """A stage or a requested layer failed while starting."""

    exit_code = ExitCode.STAGE_FAILED


class TimedOut(NotReady):
    exit_code = ExitCode.TIMED_OUT


class ServiceError(SluiceError):
    """up refused (already running) or a stop that did not go cleanly."""

    exit_code = ExitCode.FAILED


# ------------------------------------------------------------------ waiting


def _owned_layers(stage: str, posture: Posture) -> list[str]:
    return [spec.name for spec in LAYERS
            if spec.stage == stage and spec.gates and posture.layers[spec.name].requested]


def wait_until_ready(settings: Settings, wanted: list[str], timeout: float, *,
                     exited: Callable[[], str] = lambda: "",
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> Posture:
    """Return the posture once every wanted stage is ready and every requested layer they
    own is on; NotReady naming the layer as soon as one failed, TimedOut at the deadline.
    exited() returns why the pipeline is gone (up watches honcho with it), else ""."""
    deadline = clock() + timeout
    names = set(wanted)
    while True:
        posture = read_posture(settings, STAGES)
        for stage in wanted:
            state = posture.stages[stage]
            if state.state == "failed":
                layers = _owned_layers(stage, posture)
                prefix = f"layer {', '.join(layers)} not on: " if layers else ""
                raise NotReady(f"{prefix}stage {stage} failed: {state.detail}")
        settled = posture.settled_failures(names)
        if settled:
            raise NotReady("; ".join(settled))
        gone = exited()
        if gone:
            raise NotReady(gone)
        starting = [s for s in wanted if posture.stages[s].state != "ready"]
        problems = posture.problems(names)
        if not starting and not problems:
            return posture
        if clock() >= deadline:
            waiting = [f"stages {', '.join(starting)}"] if starting else []
            waiting += problems
            raise TimedOut(f"timed out after {timeout:g}s waiting for: {'; '.join(waiting)}")
        sleep(WAIT_STEP_S)


# ------------------------------------------------------------------ the service record


@dataclasses.dataclass
class Record:
    pid: int                 # honcho's
    pid_start: str           # its start time in /proc, so a reused pid is not taken for it
    started_ns: int
    log: str
    pid_file: str
    mode: str
    environment: dict        # the SLUICE_* values the pipeline runs with (secrets left out)
    stages: dict             # stage -> pid, once ready

    @staticmethod
    def path(run_dir: Path) -> Path:
        return run_dir / "sluice.json"

    def save(self, run_dir: Path) -> None:
        write_atomic(self.path(run_dir), json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, run_dir: Path) -> Record | None:
        try:
            return cls(**json.loads(cls.path(run_dir).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> bool:
        return process_start(self.pid) == self.pid_start


def recorded_settings(environ: Mapping[str, str]) -> tuple[Settings, Record | None]:
    """The settings of the pipeline recorded in the run dir (what up ran it with) with the
    per-stop choices (the gate) from environ, and the record; environ alone when nothing is
    recorded there."""
    settings = Settings.from_env(environ)
    record = Record.load(settings.run_dir)
    if record is None:
        return settings, None
    merged = dict(environ)
    merged.update({k: v for k, v in record.environment.items() if k not in PER_STOP_VARIABLES})
    return Settings.from_env(merged), record


# ------------------------------------------------------------------ up


def procfile_text(sluice: str) -> str:
    """One line per stage of the topology, as the repository's Procfile has them."""
    return "".join(f"{stage}: exec {shlex.quote(sluice)} run {stage}\n" for stage in STAGES)


def sluice_executable() -> str:
    found = Path(sys.executable).parent / "sluice"
    return str(found) if found.exists() else "sluice"


def read_env_file(path: Path) -> dict[str, str]:
    """A .env file in honcho's format."""
    from honcho.environ import parse

    try:
        return dict(parse(path.read_text()))
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ServiceError(f"--env-file {path}: cannot read: {reason}") from None


@contextlib.contextmanager
def _starting(run_dir: Path) -> Iterator[None]:
    """One `sluice up` at a time per run dir."""
    with open(run_dir / "sluice.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServiceError(f"another `sluice up` is starting in {run_dir}") from None
        yield


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def up(environ: Mapping[str, str], *, log: Path | None, pid_file: Path | None,
       env_file: Path | None, timeout: float, cwd: Path) -> tuple[Record, Posture]:
    """Start the pipeline in the background and wait until it is fully on."""
    environ = dict(environ)
    if env_file is not None:
        environ.update(read_env_file(env_file))
    settings = Settings.from_env(environ)
    run_dir = settings.run_dir
    prepare_run_dir(run_dir)
    with _starting(run_dir):
        previous = Record.load(run_dir)
        if previous is not None and previous.running():
            raise ServiceError(
                f"already running (pid {previous.pid}, {previous.mode} mode, log "
                f"{previous.log}); `sluice down` stops it")
        others = _stage_pids(settings)
        if others:
            running = ", ".join(f"{name} pid {pid}" for name, pid in others.items())
            raise ServiceError(f"stages started otherwise (honcho start?) are running in "
                               f"{run_dir} ({running}); stop them first")
        _clear_markers(run_dir)
        log = log or run_dir / "sluice.log"
        pid_file = pid_file or run_dir / "sluice.pid"
        procfile = run_dir / "Procfile"
        procfile.write_text(procfile_text(sluice_executable()))
        environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}"
        environ["PYTHONUNBUFFERED"] = "1"  # the log's last lines are there when they matter
        with open(log, "w") as out:
            honcho = subprocess.Popen(
                [sys.executable, "-m", "honcho", "start", "-f", str(procfile), "-e", os.devnull,
                 "--no-colour"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                env=environ, start_new_session=True)
        record = Record(honcho.pid, process_start(honcho.pid), time.time_ns(), str(log),
                        str(pid_file), settings.mode, _recorded(environ), {})
        record.save(run_dir)
        write_atomic(pid_file, f"{honcho.pid}\n")

        def exited() -> str:
            code = honcho.poll()
            return f"honcho exited with status {code} before the pipeline was ready" \
                if code is not None else ""

        try:
            posture = wait_until_ready(settings, list(STAGES), timeout, exited=exited)
        except NotReady as err:
            record.stages = _stage_pids(settings)
            _stop(honcho.pid, record.pid_start)
            honcho.wait()
            _undo(settings, record)
            tail = log_tail(log)
            raise type(err)(f"{err}\n--- the last lines of {log} ---\n{tail}"
                            if tail else str(err)) from None
        record.stages = {name: s.pid for name, s in posture.stages.items()}
        record.save(run_dir)
        return record, posture


def _stage_pids(settings: Settings) -> dict[str, int]:
    posture = read_posture(settings, STAGES)
    return {name: s.pid for name, s in posture.stages.items() if s.pid}


def _recorded(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(environ.items())
            if k.startswith("SLUICE_") and k not in SECRET_VARIABLES}


def _clear_markers(run_dir: Path) -> None:
    """A failed marker of an earlier run must not fail this one before its stage starts."""
    for stage in STAGES:
        for what in ("failed", "ready", "layers.json", "stopping"):
            (run_dir / f"{stage}.{what}").unlink(missing_ok=True)


def _undo(settings: Settings, record: Record) -> None:
    """After a failed start: no process, nothing attached, no record left."""
    _kill_left_over(record)
    detach_leftovers(settings)
    Record.path(settings.run_dir).unlink(missing_ok=True)
    Path(record.pid_file).unlink(missing_ok=True)


# ------------------------------------------------------------------ down


@dataclasses.dataclass
class Stopped:
    record: Record
    was_running: bool             # False: the pipeline had stopped on its own before down
    exit_codes: dict[str, str]    # stage -> "rc=0" as honcho reported it
    left_over: list[str]          # stage processes that had to be killed
    removed: list[str]            # what detach removed

    def problems(self) -> list[str]:
        lines = []
        if not self.was_running:
            lines.append(f"the pipeline (pid {self.record.pid}) had stopped before "
                         f"`sluice down`: protection ended early (see {self.record.log})")
        for stage in STAGES:
            code = self.exit_codes.get(stage)
            if self.was_running and code != "rc=0":
                lines.append(f"stage {stage} did not stop cleanly ({code or 'no exit status'};"
                             f" see {self.record.log})")
        lines += [f"stage {name} was still running after the stop and was killed"
                  for name in self.left_over]
        return lines


def down(settings: Settings, record: Record, *, keep_filter: bool,
         timeout: float = STOP_WAIT_S) -> Stopped:
    """Stop the recorded pipeline, wait until every process is gone, detach (in enforce
    mode only when not keep_filter; audit mode always leaves the host as it was)."""
    was_running = record.running()
    if was_running:
        _stop(record.pid, record.pid_start, timeout)
    left_over = _kill_left_over(record)
    stops = re.findall(r"(\w+)\.1 stopped \((rc=-?\d+)\)", log_tail(Path(record.log), 10_000))
    removed = [] if keep_filter and record.mode == "enforce" else detach_leftovers(settings)
    Record.path(settings.run_dir).unlink(missing_ok=True)
    Path(record.pid_file).unlink(missing_ok=True)
    return Stopped(record, was_running, dict(stops), left_over, removed)


def detach_leftovers(settings: Settings) -> list[str]:
    from .kernel.loader import detach_instance

    return detach_instance(settings)


def _stop(pid: int, pid_start: str, timeout: float = STOP_WAIT_S) -> None:
    """SIGTERM honcho (it stops the stages); SIGKILL its group if it overstays."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_start(pid) == pid_start and time.monotonic() < deadline:
        time.sleep(WAIT_STEP_S)
    if process_start(pid) == pid_start:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _kill_left_over(record: Record) -> list[str]:
    """Stage processes honcho did not take down with it (each runs in its own session)."""
    left = []
    for stage, pid in record.stages.items():
        if pid and pid_alive(pid) and _is_stage(pid, stage):
            left.append(stage)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return left


def _is_stage(pid: int, stage: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"run" in argv and stage.encode() in argv


# ------------------------------------------------------------------ systemd


def systemd_units(sluice: str, env_file: Path, user: str = "root") -> dict[str, str]:
    """Unit files for servers: sluice.target and one service per stage, all reading their
    settings from env_file when they start (so secrets stay in that one root-only file).
    No unit is ordered after another: a stop signals the stages at once, as honcho does, and
    their feed ends put it in the pipeline's order (pipeline/stopping.py)."""
    units = {"sluice.target": (
        "[Unit]\n"
        "Description=sluice egress firewall (all stages)\n"
        f"Wants={' '.join(f'sluice-{stage}.service' for stage in STAGES)}\n"
        "After=network-online.target\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n")}
    for stage in STAGES:
        units[f"sluice-{stage}.service"] = (
            "[Unit]\n"
            f"Description=sluice {stage} stage\n"
            "PartOf=sluice.target\n"
            "After=network-online.target\n\n"
            "[Service]\n"
            "Type=simple\n"
            f"User={user}\n"
            f"EnvironmentFile={env_file}\n"
            f"ExecStart={sluice} run {stage}\n"
            "Restart=on-failure\n"
            "RestartSec=2\n"
            # The stage stops within 5 s; SIGKILL after that, the whole unit.
            "KillMode=mixed\n"
            "TimeoutStopSec=10\n"
            f"SyslogIdentifier=sluice-{stage}\n\n"
            "[Install]\n"
            "WantedBy=sluice.target\n")
    return units
