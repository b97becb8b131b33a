"""The loop every stage runs in: sockets, polling, signals, counters, markers and teardown.

A stage supplies setup(io), handle(inbox, kind, records), tick(now) and teardown(); this
module owns the ZeroMQ context, the poller with a short timeout, the stop flag set by signal
handlers, periodic counter logs (also written to <run_dir>/<stage>.counters.json so
`sluice status` can show them), the ready/failed markers and clean teardown.

Back-pressure: every send is non-blocking. A batch that finds the peer's queue full waits in
a small local backlog and is retried; when the backlog is full the batch is dropped and
counted (<feed>_dropped). Capture and the enforcement path never wait on an observer.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol

import zmq

from . import messages as wire
from .errors import MessageError, SluiceError
from .settings import Settings
from .topology import STAGES, Inbox, inbox_address

POLL_MS = 100
RECV_BURST = 256          # messages taken from one socket before looking at the others
HIGH_WATER_MARK = 10_000  # messages (batches) queued per socket
LINGER_MS = 2000          # a closing PUSH socket may take this long to hand over its queue
DRAIN_QUIET_S = 0.3       # after a stop: keep receiving until inboxes are quiet this long
DRAIN_DEADLINE_S = 3.0    # ... but never longer than this (honcho allows 5 s in all)


class Counters:
    """Named event counts of one stage; every place an event can be dropped has one."""

    def __init__(self) -> None:
        self._values: dict[str, int] = collections.defaultdict(int)

    def add(self, name: str, n: int = 1) -> None:
        self._values[name] += n

    def set(self, name: str, value: int) -> None:
        self._values[name] = value

    def get(self, name: str) -> int:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._values.items()))


class Feed:
    """A PUSH socket to another stage's inbox that never blocks its caller."""

    def __init__(self, socket: zmq.Socket, name: str, counters: Counters, backlog: int) -> None:
        self.socket = socket
        self.name = name
        self.counters = counters
        self.backlog: collections.deque[tuple[bytes, int]] = collections.deque()
        self.backlog_limit = backlog

    def send(self, records: list, kind: str | None = None) -> None:
        if not records:
            return
        self._queue(wire.encode(records, kind), len(records))

    def send_frame(self, frame: bytes, count: int) -> None:
        self._queue(frame, count)

    def _queue(self, frame: bytes, count: int) -> None:
        if not self.backlog and self._try(frame):
            self.counters.add(f"{self.name}_sent", count)
            return
        if len(self.backlog) >= self.backlog_limit:
            self.counters.add(f"{self.name}_dropped", count)
            return
        self.backlog.append((frame, count))

    def _try(self, frame: bytes) -> bool:
        try:
            self.socket.send(frame, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def flush(self) -> None:
        """Retry the backlog; called by the loop on every iteration."""
        while self.backlog:
            frame, count = self.backlog[0]
            if not self._try(frame):
                return
            self.backlog.popleft()
            self.counters.add(f"{self.name}_sent", count)

    def pending(self) -> int:
        return sum(count for _, count in self.backlog)


class StageIO:
    """What a stage gets at setup: its settings, logger, counters and socket factory."""

    def __init__(self, name: str, settings: Settings, ctx: zmq.Context, stop: threading.Event,
                 log: logging.Logger) -> None:
        self.name = name
        self.settings = settings
        self.ctx = ctx
        self.stop = stop
        self.log = log
        self.counters = Counters()
        self.inboxes: dict[zmq.Socket, Inbox] = {}
        self.feeds: list[Feed] = []
        self.fds: dict[int, Callable[[], None]] = {}
        self.sockets: list[zmq.Socket] = []
        self.bound_paths: list[Path] = []
        self.ready = False
        self.layers: dict[str, dict] = {}

    def report_layer(self, name: str, state: str, detail: str, *, requested: bool = True,
                     **facts) -> None:
        """Say how a protection layer stands (pipeline/posture.py): written to
        <run_dir>/<stage>.layers.json at once, when it changed."""
        entry = {"state": state, "requested": requested, "detail": detail, **facts}
        if self.layers.get(name) == entry:
            return
        self.layers[name] = entry
        try:
            write_atomic(marker_path(self.settings.run_dir, self.name, "layers.json"),
                         json.dumps({"stage": self.name, "pid": os.getpid(),
                                     "time": time.time(), "layers": self.layers}))
        except OSError as err:  # the posture then says the layer is unreported: not on
            self.log.warning("cannot write the layers file: %s", err)

    def bind_inboxes(self) -> dict[str, zmq.Socket]:
        """Bind every inbox the topology gives this stage; returns them by name."""
        bound = {}
        for inbox in STAGES[self.name].inboxes:
            sock = self.ctx.socket(zmq.PULL if inbox.pattern == "pull" else zmq.REP)
            sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
            sock.setsockopt(zmq.LINGER, 0)
            path = self.settings.run_dir / f"{inbox.name}.sock"
            if path.exists():
                path.unlink()  # a stale socket file from a stage that died
            sock.bind(inbox_address(self.settings.run_dir, inbox.name))
            self.bound_paths.append(path)
            self.sockets.append(sock)
            self.inboxes[sock] = inbox
            bound[inbox.name] = sock
        return bound

    def connect_feed(self, inbox: str, backlog: int = 64) -> Feed:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.connect(inbox_address(self.settings.run_dir, inbox))
        self.sockets.append(sock)
        feed = Feed(sock, inbox, self.counters, backlog)
        self.feeds.append(feed)
        return feed

    def connect_feeds(self) -> dict[str, Feed]:
        return {inbox: self.connect_feed(inbox) for inbox in STAGES[self.name].feeds}

    def watch_fd(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Poll a plain file descriptor (the ring buffer's epoll fd) with the sockets."""
        self.fds[fd] = on_readable


class Stage(Protocol):
    name: str

    def setup(self, io: StageIO) -> None: ...
    def handle(self, inbox: str, kind: str, records: list) -> None: ...
    def tick(self, now: float) -> None: ...
    def hangup(self) -> None: ...
    def teardown(self) -> None: ...


class BaseStage:
    """Defaults for the optional parts of a stage."""

    name = "stage"
    io: StageIO

    def setup(self, io: StageIO) -> None:
        self.io = io

    def handle(self, inbox: str, kind: str, records: list) -> None:
        raise NotImplementedError

    def reply(self, inbox: str, kind: str, records: list) -> bytes:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        pass

    def hangup(self) -> None:
        pass

    def teardown(self) -> None:
        pass


def marker_path(run_dir: Path, stage: str, what: str) -> Path:
    return run_dir / f"{stage}.{what}"


def prepare_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class _Signals:
    """Signal handlers only set flags. They stay installed after the loop ends: honcho may
    signal a stage more than once, and a late SIGTERM must not kill a stage mid-teardown.
    (Stages run in test threads get none; their stop event is set directly.)"""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.hup = threading.Event()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.hup.set())


class _OncePerKind:
    """Log a malformed-input complaint once per (inbox, reason kind), count every one."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, inbox: str, err: Exception) -> None:
        key = (inbox, str(err).split(":", 1)[0])
        if key not in self.seen:
            self.seen.add(key)
            self.log.warning("skipping malformed message on %s inbox: %s (counted, logged once)",
                             inbox, err)


def run_stage(stage: Stage, settings: Settings, *, ctx: zmq.Context | None = None,
              stop: threading.Event | None = None) -> int:
    """Run one stage until stop is set (or SIGTERM/SIGINT); returns the exit code."""
    log = logging.getLogger(f"sluice.{stage.name}")
    stop = stop or threading.Event()
    own_ctx = ctx is None
    ctx = ctx or zmq.Context()
    prepare_run_dir(settings.run_dir)
    failed = marker_path(settings.run_dir, stage.name, "failed")
    ready = marker_path(settings.run_dir, stage.name, "ready")
    layers = marker_path(settings.run_dir, stage.name, "layers.json")
    for stale in (failed, ready, layers, marker_path(settings.run_dir, stage.name, "counters.json")):
        stale.unlink(missing_ok=True)
    io = StageIO(stage.name, settings, ctx, stop, log)
    signals = _Signals(stop)
    signals.install()
    try:
        try:
            stage.setup(io)
            _loop(stage, io, signals, ready)
        except SluiceError as err:
            write_atomic(failed, f"{err}\n")
            log.error("%s", err)
            return err.exit_code
        return 0
    finally:
        try:
            stage.teardown()  # also after a failed setup: stages undo what they started
        finally:
            for feed in io.feeds:
                feed.flush()
                if feed.pending():
                    io.counters.add(f"{feed.name}_dropped", feed.pending())
            _log_counters(io, log, final=True)
            for sock in io.sockets:
                sock.close()
            for path in io.bound_paths:  # libzmq leaves ipc socket files behind
                path.unlink(missing_ok=True)
            if own_ctx:
                ctx.term()
            ready.unlink(missing_ok=True)
            layers.unlink(missing_ok=True)  # a stopped stage vouches for no layer


def _loop(stage: Stage, io: StageIO, signals: _Signals, ready_marker: Path) -> None:
    poller = zmq.Poller()
    for sock in io.inboxes:
        poller.register(sock, zmq.POLLIN)
    for fd in io.fds:
        poller.register(fd, zmq.POLLIN)
    complain = _OncePerKind(io.log)
    interval = io.settings.counter_interval
    next_counters = time.monotonic() + interval
    marked_ready = False
    drain_started = quiet_since = None

    while True:
        if io.ready and not marked_ready:
            write_atomic(ready_marker, f"pid={os.getpid()}\n")
            marked_ready = True
        events = dict(poller.poll(POLL_MS if drain_started is None else 50))
        received = False
        for sock, inbox in io.inboxes.items():
            if events.get(sock):
                received |= _receive(stage, sock, inbox, io, complain)
        for fd, on_readable in io.fds.items():
            if events.get(fd):
                on_readable()
        now = time.monotonic()
        stage.tick(now)
        for feed in io.feeds:
            feed.flush()
        if signals.hup.is_set():
            signals.hup.clear()
            stage.hangup()
        if now >= next_counters:
            _log_counters(io, io.log)
            next_counters = now + interval
        if io.stop.is_set():
            # Keep taking what upstream stages already sent, then stop.
            if drain_started is None:
                drain_started = quiet_since = now
            if received:
                quiet_since = now
            if now - quiet_since >= DRAIN_QUIET_S or now - drain_started >= DRAIN_DEADLINE_S:
                return


def _receive(stage: Stage, sock: zmq.Socket, inbox: Inbox, io: StageIO, complain) -> bool:
    received = False
    for _ in range(RECV_BURST):
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        received = True
        try:
            kind, records, bad = wire.decode(frame)
            if kind not in inbox.kinds:
                raise MessageError(f"kind {kind} is not accepted here")
        except MessageError as err:
            io.counters.add("malformed_messages")
            complain(inbox.name, err)
            if inbox.pattern == "rep":
                sock.send(b"")  # a REP socket must answer; an empty frame means "rejected"
            continue
        if bad:
            io.counters.add("malformed_records", bad)
            complain(inbox.name, MessageError(f"{kind}: {bad} record(s) with bad fields"))
        io.counters.add(f"{kind}_received", len(records))
        if inbox.pattern == "rep":
            sock.send(stage.reply(inbox.name, kind, records))
        else:
            stage.handle(inbox.name, kind, records)
    return received


def _log_counters(io: StageIO, log: logging.Logger, final: bool = False) -> None:
    snapshot = io.counters.snapshot()
    text = " ".join(f"{k}={v}" for k, v in snapshot.items()) or "none yet"
    log.info("%scounters: %s", "final " if final else "", text)
    try:
        write_atomic(marker_path(io.settings.run_dir, io.name, "counters.json"),
                     json.dumps({"stage": io.name, "pid": os.getpid(), "time": time.time(),
                                 "counters": snapshot}))
    except OSError as err:
        log.warning("cannot write counters file: %s", err)


def batched(items: Iterable, size: int) -> Iterable[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
