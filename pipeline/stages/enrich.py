"""enrich: give each kernel event the name of its destination.

Consumes: `raw_events` batches (from capture, or from `sluice replay`) and `dns_mappings`
          (names the dns stage resolved) on ipc://<run_dir>/enrich.sock.
Produces: `enriched_events` batches (address text, protocol name, the process name the
          kernel recorded, the hostname wherever it is known, the CNAME chain), pushed to
          policy (ipc://<run_dir>/policy.sock).
Binds:    enrich.sock. Connects: policy.
Names:    (pipeline/names/namer.py, reference §2.2) the DNS-derived cache, bounded and aged: the
          exact address, else the forward match over the policy's tracked hostnames; for an
          address it does not know and that was never looked up, one reverse (PTR) lookup
          against the system resolver (the first nameserver of /etc/resolv.conf; with the
          DNS redirect, the proxy's upstream from marked sockets), 500 ms at most, whose
          name is reported as the tracked hostname a rule knows it by; a recorded CNAME
          chain names its origin.
Never stalls: lookups run beside the loop (pipeline/names/reverse.py). While one is in flight,
          events for that address wait, in arrival order, for at most its 500 ms; events for
          every other address go on at once. At most MAX_HELD events wait in all: beyond,
          the address that has waited longest is sent on unnamed (held_over_limit), and
          beyond MAX_LOOKUPS lookups in flight a new address goes on unnamed without one
          (ptr_busy; a later event may look it up). Lookups begin at most LOOKUP_RATE a
          second, LOOKUP_BURST at once (pipeline/names/namer.py: LookupBudget), so a scan is
          not echoed as PTR questions to the resolver; beyond, an address goes on unnamed
          the same way (ptr_over_budget). No event is dropped here: at a stop,
          what still waits is sent unnamed (held_at_stop).
Policy:   the start-up policy the policy and dns stages judge by (pipeline/livepolicy.py), for its
          tracked hostnames; reloaded on SIGHUP and when the file changes (an invalid file
          keeps the previous policy). A policy that does not load stops the stage at start.
Counters: ptr_lookups, ptr_named, ptr_no_name, ptr_timeout, ptr_error, ptr_not_sent,
          names_from_lookups, events_named, held_over_limit, ptr_busy, ptr_over_budget,
          held_at_stop, policy_reloads, policy_reload_failures, lookups_thread_errors (the
          lookup thread's own errors, each logged; `sluice status` shows whether it is
          alive; if it dies the stage exits non-zero).
Records: with SLUICE_RECORD, every raw_events and dns_mappings batch, as it arrives, goes to
          that file for `sluice replay` (pipeline/recording.py), written on each loop tick.
Bad input: a malformed message or record is counted and skipped (logged once per kind).
Never blocks: a batch policy cannot take waits in a small backlog, then is dropped and
          counted (policy_dropped).

Example:  sluice run enrich
"""

from __future__ import annotations

import threading

import zmq

from ..errors import SettingsError
from ..events import EnrichedEvent, RawEvent
from ..kernel.redirect import check_mark
from ..kernel.structs import DNS_MARK
from ..livepolicy import LivePolicy
from ..loop import BaseStage, StageIO, batched, run_stage
from ..names.namer import NS_PER_S, HeldEvents, LookupBudget, Namer
from ..hostfiles import HostFiles
from ..startup import proxy_upstream
from ..recording import NoRecorder, open_recorder
from ..names.reverse import CONCURRENCY, NAMED, NOT_SENT, ReverseLookups, ReverseResolver
from ..settings import Settings
from ..topology import wiring_text

MAX_HELD = 20_000     # events waiting for lookups: 0.5 s of a 40,000 events/s flood
MAX_LOOKUPS = CONCURRENCY  # more in flight than can be sent would only hold events longer


class EnrichStage(BaseStage):
    name = "enrich"

    def __init__(self, reverse: ReverseLookups | None = None, max_held: int = MAX_HELD,
                 max_lookups: int = MAX_LOOKUPS, files: HostFiles | None = None,
                 budget: LookupBudget | None = None) -> None:
        self.reverse = reverse
        self.budget = LookupBudget() if budget is None else budget
        self.files = files
        self.held: HeldEvents[RawEvent] = HeldEvents(max_held)
        self.max_lookups = max_lookups
        self.lookups: dict[str, int] = {}  # address -> timestamp of the event that asked
        self.recorder = NoRecorder()

    def setup(self, io: StageIO) -> None:
        self.io = io
        self.recorder = open_recorder(io.settings, io.counters, io.log)
        self.live = LivePolicy(io, self._apply, self.files)
        self.namer = Namer(self.live.current)
        self.reverse = self.reverse or reverse_resolver(io.settings)
        self.reverse.start()
        io.watch_fd(self.reverse.fd, self._lookups_ended)
        if self.reverse.worker is not None:
            io.watch_worker(self.reverse.worker)
        io.bind_inboxes()
        self.feed = io.connect_feeds()["enriched_events"]
        io.ready = True
        io.log.info("%s; names from %r; reverse lookups via %r", wiring_text(self.name),
                    self.live.current, self.reverse)

    # ------------------------------------------------------------- events

    def handle(self, inbox: str, kind: str, records: list) -> None:
        self.recorder.add(kind, records)
        if kind == "dns_mappings":
            for mapping in records:
                self.namer.learn(mapping)
        else:
            self._name(records)

    def _name(self, events: list[RawEvent]) -> None:
        ready: list[RawEvent] = []
        starting: list[str] = []
        for event in events:
            ip = event.dst_ip
            if ip in self.held:
                ready += self._hold(event)
            elif self.namer.wants_lookup(ip) and self._may_look_up(event):
                starting.append(ip)
                ready += self._hold(event, begin=True)
            else:
                ready.append(event)
        assert self.reverse is not None, "setup() made the reverse lookups"
        self.reverse.submit(starting)
        self._send(ready)

    def _may_look_up(self, event: RawEvent) -> bool:
        if len(self.lookups) >= self.max_lookups:
            self.io.counters.add("ptr_busy")
            return False
        if not self.budget.take(event.timestamp_ns / NS_PER_S):
            self.io.counters.add("ptr_over_budget")
            return False
        self.lookups[event.dst_ip] = event.timestamp_ns
        self.namer.attempted.add(event.dst_ip)
        self.io.counters.add("ptr_lookups")
        return True

    def _hold(self, event: RawEvent, begin: bool = False) -> list[RawEvent]:
        let_go = self.held.hold(event.dst_ip, event, begin=begin)
        self.io.counters.add("held_over_limit", len(let_go))
        return let_go

    def _lookups_ended(self) -> None:
        ready: list[RawEvent] = []
        assert self.reverse is not None, "setup() made the reverse lookups"
        for lookup in self.reverse.finished():
            asked_at = self.lookups.pop(lookup.ip)
            self.io.counters.add(f"ptr_{lookup.outcome}")
            if lookup.outcome == NOT_SENT:
                self.namer.attempted.discard(lookup.ip)  # never asked: a later event may
            # Only a forward-confirmed name is trusted (pipeline/names/reverse.py says why).
            elif self.namer.lookup_ended(lookup.ip, lookup.answer if lookup.outcome == NAMED
                                         else "", asked_at):
                self.io.counters.add("names_from_lookups")
            ready += self.held.release(lookup.ip)
        self._send(ready)

    def _send(self, events: list[RawEvent]) -> None:
        enriched = []
        for event in events:
            hostname, chain = self.namer.name_of(event.dst_ip, event.timestamp_ns)
            enriched.append(EnrichedEvent.from_raw(event, hostname, chain))
        self.io.counters.add("events_named", sum(1 for e in enriched if e.dst_hostname))
        for batch in batched(enriched, self.io.settings.batch_max):
            self.feed.send(batch)

    # ------------------------------------------------------------- policy

    def tick(self, now: float) -> None:
        self.recorder.flush()

    def hangup(self) -> None:
        self.live.reload("SIGHUP")

    def _apply(self, policy) -> None:
        self.namer.set_policy(policy)

    def finish(self) -> None:
        """What waits for a name goes on unnamed: policy is stopping too."""
        waiting: list[RawEvent] = []
        for ip in self.held:
            waiting += self.held.release(ip)
        self.io.counters.add("held_at_stop", len(waiting))
        self._send(waiting)

    def teardown(self) -> None:
        self.finish()  # a stop that ran out of time, or a failed start: nothing is kept
        if self.reverse is not None:
            self.reverse.close()
        self.recorder.close()


def reverse_resolver(settings: Settings) -> ReverseResolver:
    """The system resolver; with the redirect, the proxy's upstream, asked around the proxy
    (pipeline/names/reverse.py says why)."""
    if not settings.dns_redirect:
        return ReverseResolver.from_resolv_conf()
    try:
        upstream = proxy_upstream(settings, HostFiles())
    except ValueError as err:
        raise SettingsError(f"SLUICE_DNS_UPSTREAM={settings.dns_upstream!r}: {err}") from None
    check_mark(DNS_MARK, "the reverse lookups' sockets")
    return ReverseResolver(upstream.host, upstream.port, mark=DNS_MARK)


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(EnrichStage(), settings, ctx=ctx, stop=stop)
