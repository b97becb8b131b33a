"""Replay recordings: into a running pipeline, or offline under a policy of your choice.

Live (`sluice replay FILE`): each recorded batch is pushed, as the message enrich got, to
the running pipeline's ipc://<run_dir>/enrich.sock, at the recorded pace, a multiple of it,
or as fast as enrich takes it (a full queue slows the replay down; nothing is dropped).
The running policy stage judges the events by the verdicts the kernel recorded.

Offline (`sluice replay FILE --offline --policy P --db URL`): enrich, policy and persist run
in this process, each stage object driven through its own setup/handle/tick/teardown, with
lists in place of sockets and a DictRuleMaps in place of the kernel maps. Since no kernel
judges anything, each batch of raw events is judged again (`rejudge`) against those maps as
they stand after every earlier batch was handled, and events the classifier would not have
reported under them (an allowed UDP datagram, say) are left out. Each DNS mapping is first
put to policy as the allow request the dns stage sent before it (`allow_request_for`).
So the same recording under the same policy gives the live run's outcomes; under another
policy it answers "what would this policy have blocked?". Limits: the answers the dns
stage gave are the recorded ones (a policy that would have refused a query cannot remove
the connection that followed it), and connections open at start-up are not scanned.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import msgspec
import zmq

from . import messages
from .errors import SluiceError
from .events import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, AllowRequest, DnsMapping, RawEvent
from .loop import StageIO
from .recording import Frame, Recording
from .names.reverse import NO_NAME, Lookup
from .rulemaps import ALLOW, DictRuleMaps
from .settings import Settings
from .stages.enrich import EnrichStage
from .stages.persist import PersistStage
from .stages.policy import PolicyStage
from .stopping import QUIET_S
from .topology import Link, inbox_address, inbox_path, inbox_taking

SEND_TIMEOUT_MS = 10_000  # enrich taking nothing for this long means it is stuck or gone
LINGER_MS = 10_000        # after the last frame: time for the queue to reach enrich
MAX_SLEEP_S = 0.25        # pacing sleeps in slices, so Ctrl-C is handled promptly


class ReplayError(SluiceError):
    pass


Progress = Callable[[int], None]  # called with the number of events replayed so far


@dataclasses.dataclass
class Summary:
    files: int = 0
    frames: int = 0
    events: int = 0
    mappings: int = 0
    seconds: float = 0.0
    first_arrival_ns: int = 0
    last_arrival_ns: int = 0
    left_out: int = 0  # offline: events the classifier would not have reported
    outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rows_stored: int = 0

    @property
    def recorded_seconds(self) -> float:
        return (self.last_arrival_ns - self.first_arrival_ns) / 1e9

    def lines(self) -> list[str]:
        rate = self.events / self.seconds if self.seconds > 0 else 0.0
        lines = [f"replayed {self.events} event(s) and {self.mappings} DNS mapping(s) from "
                 f"{self.files} file(s) in {self.seconds:.1f} s ({rate:,.0f} events/s; "
                 f"recorded over {self.recorded_seconds:.1f} s)"]
        if self.outcomes:
            lines.append("outcomes: " + ", ".join(f"{kind} {n}" for kind, n in
                                                  sorted(self.outcomes.items())))
            lines.append(f"rows stored: {self.rows_stored}; events the classifier would not "
                         f"have reported under this policy: {self.left_out}")
        return lines


def parse_pace(text: str) -> float | None:
    """Speed factor against the recording: 'recorded' = 1, 'max' = None (no waiting)."""
    if text == "recorded":
        return 1.0
    if text == "max":
        return None
    try:
        factor = float(text)
    except ValueError:
        factor = 0.0
    if not factor > 0 or factor == float("inf"):
        raise ReplayError(f"--pace {text!r}: use recorded, max or a speed factor such as 10")
    return factor


def frames_of(ordered: Iterable[Path]) -> Iterator[Frame]:
    for path in ordered:
        with Recording(path) as recording:
            yield from recording.frames()


def count_records(ordered: Iterable[Path]) -> int:
    """What the progress bar counts: raw events and mappings."""
    return sum(len(frame.records) for frame in frames_of(ordered))


class _Pacer:
    """Sleeps so that frames go out at factor x their recorded spacing."""

    def __init__(self, factor: float | None, stop: threading.Event) -> None:
        self.factor, self.stop = factor, stop
        self.first_arrival: int | None = None
        self.started = 0.0  # when the first frame went out

    def wait(self, arrival_ns: int) -> None:
        if self.first_arrival is None:
            self.first_arrival, self.started = arrival_ns, time.monotonic()
        if self.factor is None:
            return
        due = self.started + (arrival_ns - self.first_arrival) / 1e9 / self.factor
        while not self.stop.is_set() and (left := due - time.monotonic()) > 0:
            time.sleep(min(left, MAX_SLEEP_S))


def _tally(summary: Summary, frame: Frame) -> None:
    if summary.frames == 0:
        summary.first_arrival_ns = frame.arrival_ns
    summary.last_arrival_ns = frame.arrival_ns
    summary.frames += 1
    if frame.kind == "dns_mappings":
        summary.mappings += len(frame.records)
    else:
        summary.events += len(frame.records)


# ---------------------------------------------------------------- live

def replay_live(paths: list[Path], run_dir: Path, pace: float | None, progress: Progress,
                stop: threading.Event | None = None) -> Summary:
    """Push the recordings (in replay order) into the running pipeline's enrich inbox."""
    inbox = inbox_taking("raw_events")
    if not inbox_path(run_dir, inbox).exists():
        raise ReplayError(f"no pipeline is listening on {inbox_path(run_dir, inbox)} "
                          "(start one with honcho start, or replay --offline)")
    stop = stop or threading.Event()
    summary, pacer, started = Summary(files=len(paths)), _Pacer(pace, stop), time.monotonic()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.connect(inbox_address(run_dir, inbox))
    try:
        for frame in frames_of(paths):
            if stop.is_set():
                break
            pacer.wait(frame.arrival_ns)
            try:
                sock.send(messages.encode(frame.records, frame.kind))
            except zmq.Again:
                raise ReplayError(f"enrich took nothing for {SEND_TIMEOUT_MS // 1000} s: "
                                  "is the pipeline still running?") from None
            _tally(summary, frame)
            progress(summary.events + summary.mappings)
    finally:
        sock.close()
        ctx.term()
    summary.seconds = time.monotonic() - started
    return summary


# ---------------------------------------------------------------- offline

def rejudge(event: RawEvent, maps: DictRuleMaps) -> RawEvent | None:
    """The event as the classifier would report it under these maps (bpf/sluice.c), or None
    when it would not report it at all."""
    if event.ip_proto == IPPROTO_ICMP:
        # An allowed ICMP packet passes unreported; a denied one is a protocol block.
        return None if maps.verdict(event.dst_ip, 0, IPPROTO_ICMP) == ALLOW else event
    if event.ip_proto not in (IPPROTO_TCP, IPPROTO_UDP):
        return event  # other protocols are blocked whatever the maps say
    allowed = maps.verdict(event.dst_ip, event.dst_port, event.ip_proto) == ALLOW
    if allowed and (event.ip_proto == IPPROTO_UDP or event.mid_stream):
        return None  # only denied UDP and denied mid-stream TCP are reported
    return msgspec.structs.replace(event, allowed=allowed)


def allow_request_for(mapping: DnsMapping) -> AllowRequest:
    """The allow request the dns stage sent to policy before it sent mapping to enrich:
    under the rules of the chain's origin (the query itself when there is no chain)."""
    name = mapping.cname_chain[0] if mapping.cname_chain else mapping.name
    return AllowRequest("replay", name, list(mapping.ips), mapping.ttl,
                        list(mapping.cname_chain), mapping.timestamp_ns)


class NoReverseLookups:
    """enrich's reverse resolver in a replay: a recording holds no PTR answers, so every
    lookup ends at once without a name, and names come from the recorded DNS mappings and
    the forward match over the policy's hostnames. Signals through an eventfd, as the real
    one does, so it works in a stage loop too."""

    worker = None  # no thread of its own

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ended: list[Lookup] = []

    def __repr__(self) -> str:
        return "none (a replay has no PTR answers)"

    def start(self) -> None:
        pass

    def submit(self, ips: Iterable[str]) -> None:
        self.ended += [Lookup(ip, NO_NAME) for ip in ips]
        if self.ended:
            os.eventfd_write(self.fd, 1)

    def finished(self) -> list[Lookup]:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        ended, self.ended = self.ended, []
        return ended

    def close(self) -> None:
        os.close(self.fd)


class _Collector:
    """Stands in for a stage's Feed: keeps what the stage sends, for the next stage."""

    holding_back = False  # takes everything: nothing ever waits

    def __init__(self) -> None:
        self.records: list = []

    def send(self, records: list, kind: str | None = None) -> None:
        self.records.extend(records)

    def take(self) -> list:
        records, self.records = self.records, []
        return records


class _LocalIO(StageIO):
    """A StageIO without sockets: nothing is bound, every feed is a _Collector."""

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name, settings, None, threading.Event(),
                         logging.getLogger(f"sluice.replay.{name}"))
        self.outputs: dict[str, _Collector] = {}  # by the kind sent there

    def bind_inboxes(self) -> dict:
        return {}

    # A _Collector is no Feed (it has no socket) but has what stages use of one: send(),
    # holding_back.
    def _connect_feed(self, link: Link) -> _Collector:  # type: ignore[override]
        collector = _Collector()
        self.outputs.update(dict.fromkeys(link.kinds, collector))
        return collector

    def report_layer(self, *args, **kwargs) -> None:
        """A what-if run protects nothing: it must not show in the live posture."""


class OfflinePipeline:
    """enrich -> policy -> persist in this process, over a DictRuleMaps."""

    def __init__(self, settings: Settings) -> None:
        self.maps = DictRuleMaps()
        self.now_ns = 0  # the replayed frame's arrival: the clock policy ages its memory by
        self.enrich = EnrichStage(reverse=NoReverseLookups())
        self.policy = PolicyStage(open_maps=lambda _settings: self.maps,
                                  clock=lambda: self.now_ns)
        self.persist = PersistStage()
        self.io: dict[str, _LocalIO] = {}
        self.outcomes: collections.Counter = collections.Counter()
        started = []
        try:
            for stage in (self.persist, self.policy, self.enrich):
                self.io[stage.name] = _LocalIO(stage.name, settings)
                started.append(stage)
                stage.setup(self.io[stage.name])
        except SluiceError:
            for stage in started:
                stage.teardown()  # as run_stage does: also after a failed setup
            raise
        self._pass(self.policy)  # its timer programs the maps

    def feed(self, frame: Frame) -> int:
        """Handle one recorded batch; returns how many events were left out."""
        self.now_ns = frame.arrival_ns
        if frame.kind == "dns_mappings":
            for mapping in frame.records:
                self.policy.reply("policy-allow", "allow_requests", [allow_request_for(mapping)])
            self.enrich.handle("enrich", frame.kind, frame.records)
            left_out = 0
        else:
            events = [judged for judged in (rejudge(e, self.maps) for e in frame.records)
                      if judged is not None]
            self.enrich.handle("enrich", frame.kind, events)
            left_out = len(frame.records) - len(events)
        self.settle()
        return left_out

    def settle(self) -> bool:
        """Tick every stage and pass on what each sent; True if anything moved."""
        self._pass(self.enrich)
        enriched = self.io["enrich"].outputs["enriched_events"].take()
        if enriched:
            self.policy.handle("policy", "enriched_events", enriched)
        self._pass(self.policy)
        records = self.io["policy"].outputs["audit_records"].take()
        self.io["policy"].outputs["notices"].take()  # a what-if run alerts nobody
        self.outcomes.update(r.event_type for r in records)
        if records:
            self.persist.handle("persist", "audit_records", records)
        self._pass(self.persist)
        return bool(enriched or records)

    def _pass(self, stage) -> None:
        """What one pass of the loop does for a stage, less its sockets: ready descriptors,
        due timers, then the tick."""
        reactor = self.io[stage.name].reactor
        reactor.run_ready()
        reactor.run_due()
        stage.tick(reactor.clock())

    def finish(self) -> int:
        """Let enrich hand over what it still holds, store everything; returns rows stored."""
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < QUIET_S:
            if self.settle():
                quiet_since = time.monotonic()
            time.sleep(0.02)
        for stage in (self.enrich, self.policy, self.persist):
            stage.teardown()
        for io in self.io.values():
            io.reactor.close()
        return self.io["persist"].counters.get("rows_inserted")


def offline_settings(settings: Settings, policy: Path, db: str, mode: str | None,
                     host: str) -> Settings:
    """The settings the offline stages run with: this policy file (never the environment
    form), this database, no JSONL, no recording, no scan of this machine's connections."""
    return settings.replace(policy=policy, db=db, mode=mode or settings.mode, host=host,
                            audit_log=None, record=None, allow_existing_connections=False,
                            default_action="", allowed_hosts="", allowed_cidrs="",
                            blocked_hosts="", blocked_cidrs="", search_domains="")


def replay_offline(paths: list[Path], settings: Settings, policy: Path, db: str,
                   mode: str | None, progress: Progress,
                   stop: threading.Event | None = None) -> Summary:
    """Judge the recordings (in replay order) under policy and store the outcomes in db.

    The rows carry the recording's host name; the mode is the recording's unless given."""
    with Recording(paths[0]) as first:
        header = first.header
    stop = stop or threading.Event()
    pipeline = OfflinePipeline(offline_settings(settings, policy, db, mode or header.mode,
                                                header.host))
    summary, started = Summary(files=len(paths)), time.monotonic()
    try:
        for frame in frames_of(paths):
            if stop.is_set():
                break
            summary.left_out += pipeline.feed(frame)
            _tally(summary, frame)
            progress(summary.events + summary.mappings)
    finally:
        summary.rows_stored = pipeline.finish()
    summary.outcomes = pipeline.outcomes
    summary.seconds = time.monotonic() - started
    return summary
