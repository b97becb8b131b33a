"""The loop every stage runs in: sockets, polling, signals, counters, markers and teardown.

A stage supplies setup(io), handle(inbox, kind, records), tick(now) and teardown(); this
module owns the ZeroMQ context, the poller with a short timeout, the stop flag set by signal
handlers, periodic counter logs (also written to <run_dir>/<stage>.counters.json so
`sluice status` can show them), the ready/failed markers, the stop in the pipeline's order
(_Drain, pipeline/stopping.py: finish() and finished() at a stop) and clean teardown.

Raw descriptors (a ring buffer, an eventfd, client sockets) and timers register with the
stage's reactor, `io.reactor` (pipeline/reactor.py), which this loop polls beside the ZeroMQ
sockets: no stage runs a loop of its own. Work due at a time (a policy file to look at, a
storm summary, maps to wait for) is a reactor timer; tick(now) runs after every pass of the
loop, to send on what the pass buffered. Both follow the stage's `monotonic` clock, so a
test can build a stage with a clock it moves; the loop's own pace (counter logs, the drain
at a stop) stays on real time, as honcho's 5 s are.

Back-pressure: every send is non-blocking, and queues are short (QUEUE_MESSAGES batches a
socket), so no stage holds a flood in memory. A batch that finds the peer's queue full waits
in a local backlog and is retried. On the audit path (a feed connected with
`backpressure=True`) a waiting batch makes the stage stop taking new messages from its event
inboxes until the peer takes it: the backlog travels upstream to capture, whose on-disk
journal holds it. Feeds to observers drop a batch when their backlog is full and count it
(<feed>_dropped): capture and the enforcement path never wait on an observer.

Batching: what a stage sends in one turn of its loop leaves at the turn's end as one message
per kind (up to SLUICE_BATCH_MAX records; a full one leaves at once). A stage that fell
behind takes a burst of small batches in one turn, so under a flood messages grow on their
own and the per-message cost (a wake-up, a poll, a decode, a send in every stage) is paid
far less often; a quiet pipeline still sends each record in the turn it arrived.

Priority: request/reply inboxes (policy-allow) are served before event inboxes on every turn,
between any two event batches, and whenever a stage calls `io.serve_requests()` in the middle
of a long batch, so a flood of events never holds back a DNS answer. Across processes, each
stage takes the CPU priority step the topology gives it (cpu_step): the DNS proxy steps
forward (the others stay as started: topology.py says why). The request/reply sockets of
dns and policy have a context of their own whose I/O thread runs real-time
(answer_context), the DNS proxy's own thread runs real-time within a share of one
CPU (RealtimeThread), and the thread that answers a request is lent real-time for it by the
stage that asks (pipeline/lending.py: published in <run_dir>/<inbox>.thread, taken back by
the asker once none of its requests waits, or given back once unused for LEND_GRACE_S), so a
flood that fills every core does not stand between a client and its answer.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import math
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import zmq

from . import messages
from .cpushare import RealtimeShare
from .errors import MessageError, SluiceError
from .events import FeedEnd
from .histogram import LATENCY_BOUNDS, Histogram
from .lending import (LEND_GRACE_S, AnswerLender, answering_thread_text, give_back, lent,
                      thread_file)
from .reactor import Clock, Reactor
from .settings import Settings
from .stopping import Upstream, inputs_ended, upstream_state
from .topology import (STAGES, Inbox, Link, StageWiring, inbox_address, inbox_owner, inbox_path,
                       upstreams)
from .workers import Worker

POLL_MS = 100
RECV_BURST = 64           # event batches taken from one inbox before the loop looks around
HIGH_WATER_MARK = 10_000  # messages queued per socket on paths that are not the audit flow
QUEUE_MESSAGES = 16       # batches queued per audit-path socket (each side): memory stays flat
LINGER_MS = 2000          # a closing PUSH socket may take this long to hand over its queue
# A stop ends by this time after the signal however much is still on its way, the rest in
# capture's journal; the feeds' lingering ends by STOP_LINGER_UNTIL_S (a peer that stopped
# taking would hold ZeroMQ's close for all of LINGER_MS), which leaves a stage's teardown
# 1.5 s of honcho's 5 s before a SIGKILL.
DRAIN_DEADLINE_S = 3.0
STOP_LINGER_UNTIL_S = 3.5
DRAIN_POLL_MS = 10        # a stop in progress looks at its upstreams' markers this often


class Counters:
    """Named event counts of one stage; every place an event can be dropped has one."""

    def __init__(self) -> None:
        self._values: dict[str, int] = collections.defaultdict(int)
        self.levels: set[str] = set()

    def add(self, name: str, n: int = 1) -> None:
        self._values[name] += n

    def set(self, name: str, value: int) -> None:
        """A running total kept elsewhere (the kernel's counters)."""
        self._values[name] = value

    def level(self, name: str, value: int) -> None:
        """A quantity that goes up and down (records held, a backlog): a gauge in /metrics."""
        self.levels.add(name)
        self._values[name] = value

    def get(self, name: str) -> int:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._values.items()))


class Feed:
    """A PUSH socket to another stage's inbox that never blocks its caller.

    With backpressure the backlog is never dropped: the loop stops taking new work while it
    is not empty. Without, a batch beyond the backlog limit is dropped and counted.
    """

    def __init__(self, socket: zmq.Socket, name: str, counters: Counters, backlog: int,
                 backpressure: bool, batch_max: int) -> None:
        self.socket = socket
        self.name = name
        self.counters = counters
        # Records given to send since the last flush: a stage that handles a burst of small
        # batches in one turn of its loop passes them on as one message, so under a flood
        # each message carries many records and the per-message cost is paid less often.
        self.outgoing: list = []  # of one kind
        self.batch_max = batch_max
        self.backlog: collections.deque[tuple[bytes, int]] = collections.deque()
        self.backlog_limit = backlog
        self.backpressure = backpressure

    def send(self, records: list) -> None:
        """Take records (of one kind) to send; they leave together at the loop's next flush,
        or at once as each batch_max of them is full."""
        if not records:
            return
        if self.outgoing and self.outgoing[0].KIND != records[0].KIND:
            self._seal()  # one kind per message
        self.outgoing.extend(records)
        if len(self.outgoing) >= self.batch_max:
            self._seal(whole_only=True)

    def _seal(self, whole_only: bool = False) -> None:
        """What send took becomes messages of at most batch_max records, queued in order;
        whole_only: only full ones, the rest waits for more."""
        held, size = self.outgoing, self.batch_max
        end = len(held) - len(held) % size if whole_only else len(held)
        for start in range(0, end, size):
            batch = held[start:start + size]
            self._queue(messages.encode(batch), len(batch))
        self.outgoing = held[end:]

    def _queue(self, frame: bytes, count: int) -> None:
        if not self.backlog and self._try(frame):
            self.counters.add(f"{self.name}_sent", count)
            return
        if not self.backpressure and len(self.backlog) >= self.backlog_limit:
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
        """Send the backlog, then what send took since (order kept: a sealed message goes
        behind any backlog); called by the loop on every iteration."""
        self._seal()
        while self.backlog:
            frame, count = self.backlog[0]
            if not self._try(frame):
                return
            self.backlog.popleft()
            self.counters.add(f"{self.name}_sent", count)

    def end(self, frame: bytes) -> None:
        """Queue a feed end behind everything sent (never dropped) and try to send it."""
        self._seal()
        self.backlog.append((frame, 0))
        self.flush()

    def pending(self) -> int:
        return len(self.outgoing) + sum(count for _, count in self.backlog)

    @property
    def empty(self) -> bool:
        """Everything given to send (feed ends too) is in ZeroMQ's hands."""
        return not self.outgoing and not self.backlog

    @property
    def holding_back(self) -> bool:
        return self.backpressure and bool(self.backlog)


class StageIO:
    """What a stage gets at setup: its settings, logger, counters and socket factory."""

    def __init__(self, name: str, settings: Settings, ctx: zmq.Context | None,
                 stop: threading.Event, log: logging.Logger,
                 clock: Clock = time.monotonic, *,
                 answer_ctx: zmq.Context | None = None) -> None:
        """ctx None: a StageIO that opens no sockets (an offline replay's). answer_ctx: the
        context of the request/reply sockets, if they have their own (answer_context)."""
        self.name = name
        self.settings = settings
        self.ctx = ctx
        self.answer_ctx = answer_ctx
        self.stop = stop
        self.log = log
        self.counters = Counters()
        self.histograms: dict[str, Histogram] = {}
        self.inboxes: dict[zmq.Socket, Inbox] = {}
        self.feeds: list[Feed] = []
        self.reactor = Reactor(clock)
        self.sockets: list[zmq.Socket] = []
        self.bound_paths: list[Path] = []
        self.workers: list[Worker] = []
        self._ready = False
        self.ready_marker: Path | None = None  # run_stage's; None where no loop runs
        self.serve_requests: Callable[[], int] = lambda: 0  # set by the loop
        self.layers: dict[str, dict] = {}
        # The stage is its process's main thread: it may say which thread answers its REP
        # inboxes, and be lent real-time priority for a request (pipeline/lending.py).
        self.own_process = False
        self.thread_files: list[Path] = []
        self.lenders: dict[str, AnswerLender] = {}  # by request kind
        self.lend_unused_since: float | None = None  # lent, and no request served since
        self.feed_ends: dict[str, int] = {}  # upstream stage -> the pid of its last feed end

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        """A stage is ready: its marker (what `sluice wait-ready` looks for) is written at
        once, before anything the stage starts next (a delivery thread) can be seen."""
        if value and not self._ready and self.ready_marker is not None:
            write_atomic(self.ready_marker, f"pid={os.getpid()}\n")
        self._ready = value

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

    def _socket(self, kind: int) -> zmq.Socket:
        if self.ctx is None:
            raise RuntimeError(f"{self.name}'s StageIO has no ZeroMQ context: it opens no sockets")
        if kind in (zmq.REP, zmq.DEALER) and self.answer_ctx is not None:
            return self.answer_ctx.socket(kind)
        return self.ctx.socket(kind)

    def bind_inboxes(self) -> dict[str, zmq.Socket]:
        """Bind every inbox the topology gives this stage; returns them by name."""
        bound = {}
        for inbox in STAGES[self.name].inboxes:
            sock = self._socket(zmq.PULL if inbox.pattern == "pull" else zmq.REP)
            sock.setsockopt(zmq.RCVHWM, QUEUE_MESSAGES if inbox.pattern == "pull"
                            else HIGH_WATER_MARK)
            sock.setsockopt(zmq.MAXMSGSIZE, messages.MAX_FRAME)  # a larger one drops its sender
            sock.setsockopt(zmq.LINGER, 0)
            path = inbox_path(self.settings.run_dir, inbox.name)
            if path.exists():
                path.unlink()  # a stale socket file from a stage that died
            sock.bind(inbox_address(self.settings.run_dir, inbox.name))
            self.bound_paths.append(path)
            if inbox.pattern == "rep" and self.own_process:
                self.thread_files.append(thread_file(self.settings.run_dir, inbox.name))
                write_atomic(self.thread_files[-1], answering_thread_text())
            self.sockets.append(sock)
            self.inboxes[sock] = inbox
            bound[inbox.name] = sock
        return bound

    def connect_feeds(self) -> dict[str, Feed]:
        """A PUSH to every inbox the topology says this stage feeds, by the kind sent there.
        On the audit path a feed's batches are never dropped (the loop pauses this stage's
        event inboxes while the peer is full)."""
        feeds = {}
        for link in STAGES[self.name].feeds:
            feed = self._connect_feed(link)
            feeds.update(dict.fromkeys(link.kinds, feed))
        return feeds

    def _connect_feed(self, link: Link) -> Feed:
        sock = self._socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, QUEUE_MESSAGES)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.connect(inbox_address(self.settings.run_dir, link.inbox))
        self.sockets.append(sock)
        feed = Feed(sock, link.inbox, self.counters, link.backlog, link.audit_path,
                    self.settings.batch_max)
        self.feeds.append(feed)
        return feed

    def connect_requests(self) -> dict[str, zmq.Socket]:
        """A DEALER to every REP inbox the topology says this stage asks, by request kind:
        many requests in flight, replies matched by the caller. Each kind also gets a lender
        (self.lenders) that lends the answering thread real-time priority for a request."""
        sockets = {}
        for link in STAGES[self.name].requests:
            lender = AnswerLender(self.settings.run_dir, link.inbox, self.log, self.counters)
            self.lenders.update(dict.fromkeys(link.kinds, lender))
            sock = self._socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)  # an unanswered request is worthless after a stop
            sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
            sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
            sock.connect(inbox_address(self.settings.run_dir, link.inbox))
            self.sockets.append(sock)
            sockets.update(dict.fromkeys(link.kinds, sock))
        return sockets

    def histogram(self, name: str, bounds=LATENCY_BOUNDS) -> Histogram:
        """A latency histogram written with the counters (name: e.g. answer_latency_seconds)."""
        return self.histograms.setdefault(name, Histogram(bounds))

    def watch_fd(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Poll a plain file descriptor (the ring buffer, an eventfd) with the sockets."""
        self.reactor.register(fd, selectors.EVENT_READ, lambda _mask: on_readable())

    def holding_back(self) -> bool:
        """A feed on the audit path is full: take no new events until it drains."""
        return any(feed.holding_back for feed in self.feeds)

    def watch_worker(self, worker: Worker) -> None:
        """A helper thread the loop checks on every turn (pipeline/workers.py): its errors
        are counted, its state is in the counters file, and its death stops the stage."""
        self.workers.append(worker)

    def check_workers(self) -> None:
        for worker in self.workers:
            self.counters.set(f"{worker.name}_thread_errors", worker.errors)
            worker.check()


class Stage(Protocol):
    name: str
    monotonic: Clock

    def setup(self, io: StageIO) -> None: ...
    def handle(self, inbox: str, kind: str, records: list) -> None: ...
    def reply(self, inbox: str, kind: str, records: list) -> bytes: ...
    def tick(self, now: float) -> None: ...
    def accepting(self) -> bool: ...
    def hangup(self) -> None: ...
    def finish(self) -> None: ...
    def finished(self) -> bool: ...
    def teardown(self) -> None: ...


class BaseStage:
    """Defaults for the optional parts of a stage."""

    name = "stage"
    io: StageIO
    monotonic: Clock = staticmethod(time.monotonic)  # a test may give a stage its own

    def setup(self, io: StageIO) -> None:
        self.io = io

    def handle(self, inbox: str, kind: str, records: list) -> None:
        raise NotImplementedError

    def reply(self, inbox: str, kind: str, records: list) -> bytes:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        pass

    def accepting(self) -> bool:
        """False while the stage holds as much as it should: the loop takes no new events."""
        return True

    def hangup(self) -> None:
        pass

    def finish(self) -> None:
        """At a stop, once nothing more will come in: pass on what the stage holds."""

    def finished(self) -> bool:
        """At a stop, after finish: whether everything the stage had to send is sent."""
        return True

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
    os.chmod(tmp, 0o600)
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


def _set_priority(step: int, log: logging.Logger) -> None:
    """Move this stage's CPU priority by step (the topology's cpu_step; threads started later
    inherit it) and, when the stage leads its own session as under honcho, its session's
    autogroup to the same nice value: where the kernel groups tasks by session
    (sched_autogroup) it shares the CPU between sessions first, and a nice value alone orders
    a task only within its own. Raising needs CAP_SYS_NICE; without it the stage runs as it
    was started, with one line saying so. Stages run in test threads are left alone."""
    if not step or threading.current_thread() is not threading.main_thread():
        return
    try:
        nice = os.nice(step)
    except PermissionError:
        log.warning("cannot raise the CPU priority by %d (needs CAP_SYS_NICE): a flood's "
                    "bulk work may delay this stage", -step)
        return
    autogroup = ""
    if os.getsid(0) == os.getpid():
        try:
            Path("/proc/self/autogroup").write_text(f"{nice}\n")
            autogroup = " (and its session's autogroup)"
        except OSError:
            pass  # a kernel without autogroups: the nice value is what counts
    log.info("CPU nice %d%s", nice, autogroup)


def answer_context(log: logging.Logger) -> zmq.Context:
    """The ZeroMQ context of a stage's request/reply sockets (dns asking policy to open the
    maps for an answer), apart from its event feeds, with its I/O thread under real-time
    round-robin scheduling at the lowest priority.

    Every message passes through a context's I/O thread, which under a flood waits for a CPU
    behind the bulk stages like any other thread, twice on each side of a request: with this one
    real-time, the p99 of DNS answers during benchmarks/flood.py's flood was lower in seven of
    ten runs in turns (a tenth at the median). It only carries allow requests and their replies,
    each made first by the stage's own thread, so running it ahead of the bulk work cannot
    take a flood's CPU. policy's own thread, which also handles event batches, is ordinary
    except while dns lends it real-time for a request (pipeline/lending.py); dns's runs
    real-time within a share (RealtimeThread). Without the right to (CAP_SYS_NICE
    or RLIMIT_RTPRIO) the thread runs as started, with one line saying so: libzmq would abort
    a thread it cannot schedule.
    """
    ctx = zmq.Context()
    if _may_run_realtime():
        ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_RR)
        ctx.set(zmq.THREAD_PRIORITY, REALTIME_PRIORITY)
    else:
        log.warning("cannot run the answer path's socket thread real-time (needs CAP_SYS_NICE "
                    "or RLIMIT_RTPRIO): a flood may delay DNS answers")
    return ctx


REALTIME_PRIORITY = 1  # the lowest: ahead of every ordinary thread, behind the kernel's own


def _may_run_realtime() -> bool:
    """Whether a thread of this process may take real-time scheduling: tried on a thread of
    its own, which ends, so no thread that stays is changed."""
    allowed = []

    def attempt() -> None:
        try:
            _schedule_this_thread(realtime=True)
            allowed.append(True)
        except OSError:
            pass

    trial = threading.Thread(target=attempt, name="sluice-rt-check")
    trial.start()
    trial.join()
    return bool(allowed)


def _schedule_this_thread(*, realtime: bool) -> None:
    """The calling thread real-time (round-robin, the lowest priority) or ordinary again
    with the nice value it had; a child it forks starts ordinary. OSError where refused."""
    if realtime:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                              os.sched_param(REALTIME_PRIORITY))
    else:
        os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))


REALTIME_WINDOW_S = 0.1  # how often a stage's real-time share of the CPU is renewed


class RealtimeThread:
    """The stage's own thread run real-time within the topology's share of one CPU
    (realtime_share; pipeline/cpushare.py decides): the DNS proxy, so that a flood filling
    every core does not keep a client waiting for its answer. Past its share in a window it
    runs as an ordinary thread until the next, counted as realtime_share_spent and logged
    once. It looks once a loop turn, so a turn can run past the share by at most what one turn
    does (the proxy reads at most 64 datagrams from a socket a turn). Started after setup, so
    the threads setup started stay as they were; children forked later start ordinary
    (SCHED_RESET_ON_FORK)."""

    def __init__(self, share: float, log: logging.Logger, counters: Counters,
                 cpu_time: Callable[[], float] = time.thread_time) -> None:
        self.share = RealtimeShare(share, REALTIME_WINDOW_S)
        self.log, self.counters, self.cpu_time = log, counters, cpu_time
        self.realtime = False
        self.spent_logged = False

    def start(self) -> bool:
        """Real-time from now on; False (and one line) where it is refused."""
        try:
            self._schedule(realtime=True)
        except OSError:
            self.log.warning("cannot run this stage's thread real-time (needs CAP_SYS_NICE or "
                             "RLIMIT_RTPRIO): a flood may delay DNS answers")
            return False
        return True

    def end(self) -> None:
        """Ordinary again, as the thread was before start (a stage run in a longer-lived
        process, such as a test's, leaves its thread as it found it)."""
        if self.realtime:
            self._schedule(realtime=False)

    def follow(self, now: float) -> float | None:
        """Keep to the share at now; while it is spent, the seconds until it is renewed."""
        allowed = self.share.allows(now, self.cpu_time())
        if allowed != self.realtime:
            self._schedule(realtime=allowed)
            if not allowed:
                self._spent()
        return None if allowed else self.share.renews_in(now)

    def _schedule(self, *, realtime: bool) -> None:
        _schedule_this_thread(realtime=realtime)
        self.realtime = realtime

    def _spent(self) -> None:
        self.counters.add("realtime_share_spent")
        if not self.spent_logged:
            self.spent_logged = True
            self.log.warning(
                "used its real-time share of the CPU (%d%% of one CPU every %g s): an ordinary "
                "thread until the share is renewed (counted: realtime_share_spent; logged once)",
                round(self.share.budget_s / self.share.window_s * 100), self.share.window_s)


def _realtime_thread(wiring: StageWiring | None, log: logging.Logger,
                     counters: Counters) -> RealtimeThread | None:
    """The stage's own thread made real-time, where the topology gives it a share; stages run
    in test threads are left alone."""
    if (wiring is None or not wiring.realtime_share
            or threading.current_thread() is not threading.main_thread()):
        return None
    thread = RealtimeThread(wiring.realtime_share, log, counters)
    return thread if thread.start() else None


def _freeze_setup_objects() -> None:
    """Leave what start-up built (modules, SQLAlchemy's tables, policy, caches) out of the
    cycle collector's passes. A flood makes and drops objects fast enough for a full pass
    every second or so, and each pass walked that whole heap: up to 0.16 s at a time in
    persist. Frozen, persist used about a seventh less CPU in benchmarks/flood.py. What is
    built later is collected as before. Stages run in test threads leave the test's heap as
    it is."""
    if threading.current_thread() is threading.main_thread():
        gc.freeze()


class _OncePerKind:
    """Log a malformed-input complaint once per (inbox, reason), count every one."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, inbox: str, err: MessageError) -> None:
        key = (inbox, err.reason)
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
    counters = marker_path(settings.run_dir, stage.name, "counters.json")
    stopping = marker_path(settings.run_dir, stage.name, "stopping")
    for stale in (failed, ready, layers, counters, stopping):
        stale.unlink(missing_ok=True)
    wiring = STAGES.get(stage.name)
    answer_ctx = (answer_context(log) if own_ctx and wiring is not None and wiring.request_reply
                  else None)
    io = StageIO(stage.name, settings, ctx, stop, log, stage.monotonic, answer_ctx=answer_ctx)
    io.ready_marker = ready
    io.own_process = own_ctx and threading.current_thread() is threading.main_thread()
    signals = _Signals(stop)
    signals.install()
    if wiring is not None:
        _set_priority(wiring.cpu_step, log)
    try:
        try:
            stage.setup(io)
            _freeze_setup_objects()
            realtime = _realtime_thread(wiring, log, io.counters)
            try:
                _loop(stage, io, signals, realtime)
            finally:
                if realtime is not None:
                    realtime.end()
        except SluiceError as err:
            if stop.is_set():
                # Stopped while starting (honcho stops every stage when one fails, and the
                # signal also ends a child such as capture's compiler): the error is the
                # stop's doing, so no failure marker names this stage in place of the one
                # that failed.
                log.info("stopped while starting (%s)", err)
                return 0
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
                    # On the audit path capture's journal still holds them: counted apart.
                    lost = "unsent_at_stop" if feed.backpressure else "dropped"
                    io.counters.add(f"{feed.name}_{lost}", feed.pending())
            _log_counters(io, log, final=True)
            io.reactor.close()
            for sock in io.sockets:
                sock.close()
            for path in io.bound_paths:  # libzmq leaves ipc socket files behind
                path.unlink(missing_ok=True)
            for path in io.thread_files:
                path.unlink(missing_ok=True)
            for lender in set(io.lenders.values()):
                lender.close()
            if own_ctx:
                ctx.term()
            if answer_ctx is not None:
                answer_ctx.term()
            stopping.unlink(missing_ok=True)
            ready.unlink(missing_ok=True)  # after the feeds' lingering: see _Drain
            layers.unlink(missing_ok=True)  # a stopped stage vouches for no layer


def _loop(stage: Stage, io: StageIO, signals: _Signals,
          realtime: RealtimeThread | None = None) -> None:
    requests = [(sock, inbox) for sock, inbox in io.inboxes.items() if inbox.pattern == "rep"]
    events_in = [(sock, inbox) for sock, inbox in io.inboxes.items() if inbox.pattern == "pull"]
    complain = _OncePerKind(io.log)
    io.serve_requests = lambda: _serve_requests(stage, requests, io, complain)
    interval = io.settings.counter_interval
    reactor = io.reactor
    next_counters = time.monotonic() + interval
    drain: _Drain | None = None
    realtime_renews_in: float | None = None  # while its real-time share is spent

    while True:
        taking = _taking(stage, io)
        poller = zmq.Poller()
        for sock, _ in requests:
            poller.register(sock, zmq.POLLIN)
        if taking:
            for sock, _ in events_in:
                poller.register(sock, zmq.POLLIN)
        for feed in io.feeds:
            if feed.holding_back:
                poller.register(feed.socket, zmq.POLLOUT)  # wake as soon as the peer has room
        poller.register(reactor.fileno(), zmq.POLLIN)
        # A stage that holds a full batch gets its tick at once; otherwise wait for input,
        # or for the reactor's next timer.
        timeout = 0 if not stage.accepting() else POLL_MS if drain is None else DRAIN_POLL_MS
        due = reactor.next_due_in()
        if due is not None:
            timeout = min(timeout, math.ceil(due * 1000))
        if realtime_renews_in is not None:  # wake real-time again as soon as it may
            timeout = min(timeout, math.ceil(realtime_renews_in * 1000))
        events = dict(poller.poll(timeout))
        if realtime is not None:
            realtime_renews_in = realtime.follow(time.monotonic())
        io.serve_requests()
        received = False
        for sock, inbox in events_in:
            if events.get(sock) and _taking(stage, io):
                received |= _receive(stage, sock, inbox, io, complain)
        if events.get(reactor.fileno()):
            reactor.run_ready()
        reactor.run_due()
        stage.tick(stage.monotonic())
        now = time.monotonic()  # the loop's own pace (counter logs, the stop) is real time
        io.check_workers()
        for feed in io.feeds:
            feed.flush()
        if signals.hup.is_set():
            signals.hup.clear()
            stage.hangup()
        if now >= next_counters:
            _log_counters(io, io.log)
            next_counters = now + interval
        if io.stop.is_set():
            drain = drain or _Drain(stage, io, now)
            if received:
                drain.quiet_since = now
            if drain.done(now):
                linger = min(LINGER_MS, (STOP_LINGER_UNTIL_S - (now - drain.started)) * 1000)
                for feed in io.feeds:
                    feed.socket.setsockopt(zmq.LINGER, max(0, int(linger)))
                return


class _Drain:
    """A stop in the pipeline's order (pipeline/stopping.py): take what the upstream stages
    still send until each that is stopping has sent its feed end, pass on what the stage
    holds (finish), send it all, then a feed end to each running stage this one feeds.
    Whatever is still on its way at DRAIN_DEADLINE_S waits in capture's journal.

    A stage says it is stopping with its <stage>.stopping marker (its pid), and is running
    while its ready marker names a live process; both go only after its feeds' lingering,
    so a stage gone from the markers has handed over all it sent."""

    def __init__(self, stage: Stage, io: StageIO, now: float) -> None:
        self.stage, self.io = stage, io
        self.started = self.quiet_since = now
        self.upstreams = upstreams(stage.name) if stage.name in STAGES else ()
        self.finishing = self.ended = False
        if io.ready_marker is not None:  # a stage run by run_stage, whose marker others read
            try:
                write_atomic(marker_path(io.settings.run_dir, stage.name, "stopping"),
                             f"pid={os.getpid()}\n")
            except OSError as err:  # the stages fed then end at a quiet moment, as before
                io.log.warning("cannot write the stopping marker: %s", err)

    def done(self, now: float) -> bool:
        if now - self.started >= DRAIN_DEADLINE_S:
            self._say_what_was_left()
            return True
        if not self.finishing:
            if not inputs_ended(self._upstream_states(), now - self.quiet_since):
                return False
            self.stage.finish()
            self.finishing = True
        if not self.ended:
            if not (self.stage.finished() and self._feeds_empty()):
                return False
            self._end_feeds()
            self.ended = True
        return self._feeds_empty()

    def _upstream_states(self) -> list[Upstream]:
        run_dir = self.io.settings.run_dir
        return [upstream_state(_live_pid(marker_path(run_dir, name, "ready")),
                               _live_pid(marker_path(run_dir, name, "stopping")),
                               self.io.feed_ends.get(name))
                for name in self.upstreams]

    def _feeds_empty(self) -> bool:
        return all(feed.empty for feed in self.io.feeds)

    def _say_what_was_left(self) -> None:
        """The stop's time is up: one line on what it did not wait for (capture's journal
        holds the audit path's part; the feeds count what they still held)."""
        self.io.counters.add("stop_time_up")
        owing = [name for name, state in zip(self.upstreams, self._upstream_states(), strict=True)
                 if state is Upstream.STOPPING]
        if owing:
            left = f"{', '.join(owing)} still sending"
        elif not self.finishing:
            left = "its inbox never quiet"
        elif not self.stage.finished():
            left = "records of its own still unsent"
        else:
            left = "the next stage not taking"
        self.io.log.warning("stopped at the stop's %.0f s limit (%s): what was on its way "
                            "waits in capture's journal for the next start", DRAIN_DEADLINE_S,
                            left)

    def _end_feeds(self) -> None:
        """A feed end to each stage fed that runs (a test's own socket gets none)."""
        frame = messages.encode([FeedEnd(self.stage.name, os.getpid())])
        for feed in self.io.feeds:
            downstream = inbox_owner(feed.name)
            if _live_pid(marker_path(self.io.settings.run_dir, downstream, "ready")):
                feed.end(frame)


def _live_pid(marker: Path) -> int | None:
    """The pid a marker names ("pid=N"), if that process is alive."""
    try:
        pid = int(marker.read_text().strip().removeprefix("pid="))
        os.kill(pid, 0)
    except (OSError, ValueError):  # no marker, a torn one, or a process that is gone
        return None
    return pid


def _taking(stage: Stage, io: StageIO) -> bool:
    return stage.accepting() and not io.holding_back()


def _decode(sock: zmq.Socket, inbox: Inbox, io: StageIO, complain) -> tuple[str, list] | None:
    """One message from sock, checked for this inbox before any stage logic sees it: exactly
    one frame, a kind this inbox takes, every record in its schema's ranges. None when it was
    rejected; each rejection is counted and logged once per reason."""
    frames = sock.recv_multipart(zmq.NOBLOCK)
    try:
        if len(frames) != 1:
            raise MessageError("a message of several frames", f"{len(frames)} frames")
        kind, records, bad = messages.decode_records(frames[0])
        if kind not in inbox.kinds and not (kind == FeedEnd.KIND and inbox.pattern == "pull"):
            raise MessageError(f"kind {kind} is not accepted here")
    except MessageError as err:
        io.counters.add("malformed_messages")
        complain(inbox.name, err)
        return None
    if bad:
        io.counters.add("malformed_records", len(bad))
        for problem in bad:
            complain(inbox.name, problem)
    io.counters.add(f"{kind}_received", len(records))
    return kind, records


def _receive(stage: Stage, sock: zmq.Socket, inbox: Inbox, io: StageIO, complain) -> bool:
    """Event batches from one inbox, requests served between them; stops when held back."""
    received = False
    for _ in range(RECV_BURST):
        try:
            message = _decode(sock, inbox, io, complain)
        except zmq.Again:
            break
        received = True
        if message is not None and message[0] == FeedEnd.KIND:
            io.feed_ends.update((end.stage, end.pid) for end in message[1])
        elif message is not None:
            stage.handle(inbox.name, *message)
        if not io.serve_requests():
            _return_unused_lend(io)
        if not _taking(stage, io):
            break
    return received


def _serve_requests(stage: Stage, requests, io: StageIO, complain) -> int:
    """Answer every request waiting now; returns how many."""
    served = 0
    for sock, inbox in requests:
        while True:
            try:
                message = _decode(sock, inbox, io, complain)
            except zmq.Again:
                break
            served += 1
            # A REP socket must answer; an empty frame means "rejected".
            sock.send(b"" if message is None else stage.reply(inbox.name, *message))
    if served:
        io.lend_unused_since = None  # the lender takes it back once answered
    return served


def _return_unused_lend(io: StageIO) -> None:
    """A lend that no request has used for LEND_GRACE_S of event batches (its lender died,
    or its request never came) is given back: the flood is not judged real-time for long
    (lending.py)."""
    if not io.thread_files or not lent():
        io.lend_unused_since = None
        return
    now = time.monotonic()
    if io.lend_unused_since is None:
        io.lend_unused_since = now
    elif now - io.lend_unused_since >= LEND_GRACE_S and give_back():
        io.lend_unused_since = None
        io.counters.add("lent_priority_returned")


def _log_counters(io: StageIO, log: logging.Logger, final: bool = False) -> None:
    snapshot = io.counters.snapshot()
    text = " ".join(f"{k}={v}" for k, v in snapshot.items()) or "none yet"
    log.info("%scounters: %s", "final " if final else "", text)
    state = {"stage": io.name, "pid": os.getpid(), "time": time.time(), "counters": snapshot}
    if io.counters.levels:
        state["levels"] = sorted(io.counters.levels)
    if io.histograms:
        state["histograms"] = {name: h.snapshot() for name, h in sorted(io.histograms.items())}
    if io.workers:
        state["threads"] = {w.name: w.state() for w in io.workers}
    try:
        write_atomic(marker_path(io.settings.run_dir, io.name, "counters.json"), json.dumps(state))
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
