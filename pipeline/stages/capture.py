"""capture: load the classifier, attach it once policy has programmed the maps, drain events.

Consumes: the kernel ring buffer (struct sluice_event, bpf/sluice.h), read straight from its
          memory mapping (pipeline/kernel/ringbuf.py), the records the kernel parked in
          map_parked when the ring buffer was full, and the tails of flows gone quiet: the
          packets a flow folded into its map_flows entry after its last record, claimed by
          the kernel for capture (sluice_claim_tail; flow_tails_reported).
Produces: `raw_events` batches, pushed to enrich (ipc://<run_dir>/enrich.sock). Every record
          is first appended to the journal in SLUICE_JOURNAL_DIR (pipeline/journal.py) and
          carries its journal number and a stable event id, so persist stores it exactly
          once whatever stops or crashes in between.
Binds:    no inbox. Connects: enrich.
Kernel:   compiles bpf/sluice.c with bcc and pins every map under SLUICE_BPF_DIR (re-adopting
          pins a previous run left at the sizes they were made with: one line names a ring
          buffer or flow map that differs from SLUICE_RINGBUF_PAGES or this build); attaches
          the cgroup hooks on SLUICE_CGROUP (socket owners, the DNS redirect, owners of
          forwarded container flows), replacing those a previous run left once its own are
          on; puts the classifier on SLUICE_INTERFACE's egress only once the policy stage
          has marked the maps programmed (map_config.generation != 0), so there is no
          start-up window of false blocks. Records name their owner's cgroup
          (pipeline/kernel/cgroups.py).
Redirect: with SLUICE_DNS_REDIRECT, puts the redirect addresses on lo and turns the hooks'
          redirect on (pipeline/kernel/redirect.py), then flushes systemd-resolved's cache and
          conntrack's port-53 entries. A redirect hook the kernel refuses is one line and the
          dns_redirect layer failed; in enforce mode the stage then stops (never ready with
          the layer missing).
Never blocks: draining the ring buffer only copies it to the journal. Sending reads the
          journal back as fast as enrich takes it: when enrich is behind, the backlog waits
          on disk, not in memory. At start, what an earlier run journaled and persist has not
          marked stored is sent again (records_resent), beside the new records.
Losses:   ring-buffer records the kernel discarded or of another size are stepped over
          and counted (ring_records_skipped; the classifier makes neither). A journal that
          is full (SLUICE_JOURNAL_MAX_BYTES) or failing is one log line and a counter
          (journal_full, journal_errors); those records travel from memory (not durable),
          and beyond MAX_UNJOURNALED_BYTES of them the oldest are dropped (records_lost).
          Short records are counted (short_records) and skipped. Records the ring buffer
          refused are swept from map_parked (overflow_swept); packets the kernel could
          not park at all are counted there (kernel_lost), and packets a flood of new flows
          evicted from map_flows with their flow before they were reported are counted at
          each sweep (kernel_evicted). A failed map read is logged and counted
          (map_read_errors); the map is read again at the next sweep.
Stop:     drains the ring buffer, the parked records and every flow's pending packets (in
          their window or not) into the journal and sends them, then its feed end (enrich
          ends after it: pipeline/stopping.py); a backlog still unsent when the stop's time
          is up waits for the next start. In audit mode a clean stop detaches
          everything; in enforce mode the filter, the hooks (DNS keeps going to the proxy, or
          fails) and the maps stay (fail closed) until `sluice detach`.

Example:  SLUICE_INTERFACE=eth0 sluice run capture
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import struct
import threading
import time
from collections.abc import Callable

import zmq

from ..dns.endpoints import redirect_endpoints
from ..errors import KernelError
from ..events import FLAG_MID_STREAM
from ..journal import (Cursor, Frame, Journal, JournalError, Recovery, is_marked, read_bitmap,
                       segment_of)
from ..kernel import libbpf, redirect
from ..kernel.cgroups import CgroupPaths
from ..kernel.doctor import blocking_failures
from ..kernel.generation import programmed, read_config
from ..kernel.loader import (AGG_WINDOW_NS, HOOKS, MIDSTREAM_WINDOW_NS, V6_HOOKS, Attachment,
                             Classifier, Hook, adopted_sizes, attach_filter, attach_hooks,
                             cgroup_dir, cgroup_root, detach_filter, detach_hooks,
                             egress_interface, ipv6_disabled, load_classifier, remove_pins)
from ..kernel.maps import claim_tail, read_counter, read_counters
from ..kernel.ringbuf import HEADER, RingReader
from ..kernel.structs import FlowKey, FlowState, ParkKey
from ..loop import BaseStage, StageIO, run_stage
from ..posture import classifier_report, hooks_report, ipv6_report, ring_buffer_report
from ..kernel.event_layout import RECORD_SIZE, decode_frame, reported_record
from ..rulemaps import ALLOW
from ..settings import Settings

DRAIN_BYTES = 1 << 20          # one journal frame at most: a read of the ring buffer
SENDS_PER_TURN = 8             # batches sent per loop turn before the ring is drained again
MAX_UNJOURNALED_BYTES = 64 << 20
# Records the kernel makes in one overflow_s (each a flow's first packet in its window) from
# which capture claims every flow's pending packets at the pressed pace: at twice this rate
# new flows turn the flow map's 65,536 entries over in the two seconds a quiet flow's
# packets wait for the normal sweep.
PRESS_RECORDS = 1_600


@dataclasses.dataclass(frozen=True, slots=True)
class Paces:
    """How often capture does its periodic work, in seconds of its clock."""

    sweep_s: float = 1.0          # flow tails into the journal
    # While new flows come fast enough to evict flows with packets pending (PRESS_RECORDS), or
    # evictions are seen, every flow's pending packets are claimed this often, in their
    # window or not, until a sweep_s passes with neither.
    pressed_sweep_s: float = 0.1
    # map_parked into the journal: a full-speed flood with the ring buffer full fills its
    # 65,536 entries in about a second, and what finds it full is lost.
    overflow_s: float = 0.1
    counters_s: float = 1.0       # the kernel's counters and the layers read back
    release_s: float = 1.0        # stored journal segments deleted
    journal_retry_s: float = 1.0  # after a failed write, the disk is tried again this much later


# A flow's state starts with its last emit and its pending packets (u64 each), then the
# template of its next record; its key's fourth byte is its flags (kernel/structs.py).
_EMIT_AND_PENDING = struct.Struct(f"=QQ{ctypes.sizeof(FlowState) - 16}x")
_FLOW_KEY_SIZE = ctypes.sizeof(FlowKey)
_FLAGS_AT = FlowKey.flags.offset


def tail_due(flags: int, last_emit_ns: int, now_ns: int) -> bool:
    """Whether a flow with packets still to report has been quiet for its window (the
    kernel reports a busy flow itself; a mid-stream denial has the longer window)."""
    window = MIDSTREAM_WINDOW_NS if flags & FLAG_MID_STREAM else AGG_WINDOW_NS
    return now_ns - last_emit_ns >= window


class _Sender:
    """Journal frames on their way to enrich, a batch at a time, never dropped.

    Two cursors: records an earlier run left unstored, and this run's; turns alternate, so
    a large recovery never delays today's events for long. A batch enrich refuses waits
    (encoded) and is offered again."""

    def __init__(self, journal: Journal, recovered_until: int,
                 cgroup_path: Callable[[int], str]) -> None:
        self.journal = journal
        self.cgroup_path = cgroup_path
        self.recovery = Cursor(min(journal.segments, default=recovered_until))
        self.recovery_until = recovered_until
        self.live = Cursor(recovered_until)
        self.unjournaled: collections.deque[Frame] = collections.deque()
        self.unjournaled_bytes = 0
        self.current: list = []         # decoded records of the frame being sent
        self.frame: Frame | None = None  # that frame, decoded a batch at a time from frame_at
        self.frame_at = 0
        self.skip = None
        self.from_recovery = False
        self.turn = 0
        self._bitmap: tuple[int, bytearray] | None = None

    def next_batch(self, size: int) -> tuple[list, bool] | None:
        """The next records to send (up to size) and whether they are resent ones."""
        while not self.current:
            if self.frame is not None:
                self._decode(self.frame, size)
            elif not self._load():
                return None
        batch, self.current = self.current[:size], self.current[size:]
        return batch, self.from_recovery

    def _decode(self, frame: Frame, size: int) -> None:
        """The frame's next size records: a frame of a whole flood is never all in memory
        as objects at once."""
        start = self.frame_at
        self.frame_at = min(start + size, frame.count)
        self.current = decode_frame(frame, self.journal.journal_id, self.skip, start,
                                    self.frame_at, self.cgroup_path)
        if self.frame_at == frame.count:
            self.frame = None

    @property
    def idle(self) -> bool:
        """Nothing is known to be waiting (new frames wake the loop through the ring fd)."""
        return (not self.current and self.frame is None and not self.unjournaled
                and not self.recovering and self.journal.at_end(self.live))

    def _load(self) -> bool:
        self.turn += 1
        sources = [self._from_live, self._from_recovery]
        if self.turn % 2:
            sources.reverse()
        return any(source() for source in sources)

    def _from_live(self) -> bool:
        if self.unjournaled:
            frame = self.unjournaled.popleft()
            self.unjournaled_bytes -= len(frame.payload)
            return self._take(frame, recovery=False)
        stored = self.journal.read(self.live)
        return stored is not None and self._take(stored, recovery=False)

    def _from_recovery(self) -> bool:
        if self.recovery.index >= self.recovery_until:
            return False
        while True:
            frame = self.journal.read(self.recovery)
            if frame is None or segment_of(frame.first_seq) >= self.recovery_until:
                self.recovery.index = self.recovery_until  # done: this run's frames are live
                return False
            index = segment_of(frame.first_seq)
            if self._bitmap is None or self._bitmap[0] != index:
                self._bitmap = (index, read_bitmap(self.journal.directory, index))
            bitmap = self._bitmap[1]
            if self._take(frame, recovery=True,
                          skip=lambda seq, bitmap=bitmap: is_marked(bitmap, seq)):
                return True

    def _take(self, frame: Frame, recovery: bool, skip=None) -> bool:
        self.frame, self.frame_at, self.skip, self.from_recovery = frame, 0, skip, recovery
        return True

    @property
    def recovering(self) -> bool:
        return self.recovery.index < self.recovery_until


class CaptureStage(BaseStage):
    name = "capture"

    def __init__(self, kernel_ns: Callable[[], int] = time.monotonic_ns,
                 wall_ns: Callable[[], int] = time.time_ns, paces: Paces = Paces()) -> None:
        """kernel_ns: the clock of the kernel's timestamps (CLOCK_MONOTONIC): flows age by
        it and the stage's loop runs on it; wall_ns converts those timestamps."""
        self.kernel_ns, self.wall_ns, self.paces = kernel_ns, wall_ns, paces
        self.monotonic = lambda: kernel_ns() / 1e9
        # Made by setup() in this order; teardown closes what it got to.
        self.journal: Journal | None = None
        self.cgroups: CgroupPaths | None = None
        self.classifier: Classifier | None = None
        self.ring: RingReader | None = None  # mapped last: set-up got through once it is
        self.attachment = Attachment()
        self.has_v6 = False
        self.redirect_layer: dict = {}
        self.next_sweep = self.next_overflow = self.next_counters = self.next_release = 0.0
        self.journal_failing = False
        self.journal_retry_at = 0.0
        self.maps_failing: set[str] = set()  # maps whose last sweep failed (logged once)
        self.eviction_estimate = 0  # the last sweep's (_evicted)
        self.pressed_until = 0.0  # claiming every flow's pending packets until then
        self.records_made = 0  # the kernel's records and refused records at the last look

    def setup(self, io: StageIO) -> None:
        self.io = io
        settings = io.settings
        for failure in blocking_failures(settings):
            raise KernelError(failure.line())
        self.interface = egress_interface(settings)
        self.journal = journal = Journal(settings.journal_dir, settings.journal_max_bytes)
        try:
            found = journal.open()
        except JournalError as err:
            # Enforcement never waits on the disk: run without durability, loudly.
            found = Recovery()
            journal.broken = str(err)
            io.log.error("%s: every record goes on from memory, not durable (counted as "
                         "journal_errors)", err)
        io.counters.add("journal_damaged_bytes", found.damaged_bytes)
        self.cgroups = cgroups = CgroupPaths(cgroup_root(settings))
        self.sender = _Sender(journal, journal.recovered_until, cgroups.path)
        self.classifier = classifier = load_classifier(settings)
        self.egress_fd = classifier.egress_fd
        previous = Attachment.load(settings.run_dir) or Attachment()
        self.attachment = Attachment(interface=self.interface, bpf_dir=str(settings.bpf_dir))
        if previous.interface == self.interface:
            self.attachment.qdisc_created = previous.qdisc_created  # so a detach removes it
        cgroup = cgroup_dir(settings)
        self.attachment.cgroup = str(cgroup)
        self.redirect_fd = classifier.map_fd("map_dns_redirect")
        self.attachment.redirect_addresses = self._redirect_addresses(previous)
        self.attachment.hooks, failures = attach_hooks(classifier, cgroup)
        # The hooks a stopped (enforce mode) or killed run left go once ours are on: never a
        # moment without the redirect, nor two of each for long.
        detach_hooks(previous.cgroup, [h for h in previous.hooks if h not in self.attachment.hooks])
        self.attachment.save(settings.run_dir)
        self._redirect_state(failures)
        self.feed = io.connect_feeds()["raw_events"]
        self.config_fd = classifier.map_fd("map_config")
        self.counters_fd = classifier.map_fd("map_counters")
        self.flows_fd = classifier.map_fd("map_flows")
        self.claim_fd = classifier.claim_fd
        self.overflow_fd = classifier.map_fd("map_parked")
        ring_bytes, differences = adopted_sizes(classifier, settings)
        if differences:
            io.log.warning("maps pinned in %s by an earlier run are used as they were made: %s "
                           "(a `sluice detach` while the pipeline is stopped removes them; the "
                           "next start makes them anew)", settings.bpf_dir, "; ".join(differences))
        self.ring = RingReader(classifier.map_fd("map_events"), ring_bytes, RECORD_SIZE)
        io.counters.add("ring_records_journaled_before",
                        self.ring.skip_journaled(journal.last_frame()))
        io.watch_fd(classifier.map_fd("map_events"), self.drain)
        self._report_layers()
        io.log.info("loaded classifier, maps pinned in %s, %d cgroup hook(s) on %s; journal %s "
                    "(%d unfinished segment(s) from an earlier run); waiting for policy to "
                    "program the maps before attaching to %s", settings.bpf_dir,
                    len(self.attachment.hooks), cgroup, settings.journal_dir, found.segments,
                    self.interface)

    # ------------------------------------------------------------- DNS redirect

    def _redirect_addresses(self, previous: Attachment) -> list[str]:
        """The redirect's addresses on lo (before any hook can send queries there)."""
        if not self.io.settings.dns_redirect:
            redirect.program_map(self.redirect_fd, False, False)
            redirect.remove_addresses(previous.redirect_addresses)
            return []
        self.has_v6 = redirect.ipv6_available()
        wanted = [e.host for e in redirect_endpoints(self.has_v6)]
        added = redirect.add_addresses(wanted)
        redirect.program_map(self.redirect_fd, True, self.has_v6)
        return sorted(set(added) | set(previous.redirect_addresses))

    def _redirect_state(self, failures: list[tuple[Hook, str]]) -> None:
        """Say which hooks are missing; the redirect only works whole."""
        settings, log = self.io.settings, self.io.log
        missing_redirect = []
        for hook, line in failures:
            log.warning("%s", line)
            if hook.redirect:
                missing_redirect.append(hook.function)
        on = settings.dns_redirect and not missing_redirect
        self.io.counters.set("dns_redirect", int(on))
        targets = [str(e) for e in redirect_endpoints(self.has_v6)] if on else []
        self.redirect_layer = {"state": "on" if on else "off", "requested": settings.dns_redirect,
                               "detail": f"queries to any resolver not on loopback go to "
                                         f"{', '.join(targets)}" if on else
                                         "not requested (SLUICE_DNS_REDIRECT=false)",
                               "to": targets, "cgroup": self.attachment.cgroup}
        if settings.dns_redirect and missing_redirect:
            redirect.program_map(self.redirect_fd, False, False)
            why = (f"DNS redirect: hook(s) {', '.join(missing_redirect)} not attached, so "
                   "queries would skip the proxy")
            self.redirect_layer.update(state="failed", detail=why)
            if not settings.audit_mode:
                raise KernelError(f"{why}; enforce mode does not run without it "
                                  "(set SLUICE_DNS_REDIRECT=false to run without the redirect)")
            log.warning("%s: audit mode runs on with the redirect off", why)
            return
        if not on:
            log.info("DNS redirect off (SLUICE_DNS_REDIRECT=false): only clients that ask the "
                     "proxy go through it")
            return
        log.info("DNS redirect on: queries to any resolver not on loopback go to %s",
                 ", ".join(targets))
        if not self.has_v6:
            log.info("DNS redirect: IPv6 is off here, so IPv6 queries are refused")
        log.info("%s", redirect.flush_resolved_cache())
        log.info("%s", redirect.clear_dns_conntrack())

    # ------------------------------------------------------------- ring buffer -> journal

    def drain(self) -> None:
        """Move every finished record from the ring buffer into the journal."""
        ring = self.ring
        assert ring is not None, "drain() runs once setup() mapped the ring buffer"
        while True:
            # The records stay in the ring buffer until each part of them is journaled (or
            # kept in memory): a kill in between finds them there at the next start, where
            # skip_journaled passes over those the journal's last frame already holds.
            slots, count = ring.read(DRAIN_BYTES, release=False)
            if not count:
                return
            self.io.counters.add("records_read", count)
            shift = self.wall_ns() - self.kernel_ns()
            self._journal(Frame(0, count, ring.slot, HEADER, RECORD_SIZE, shift, slots),
                          handled=ring.release)

    def _journal(self, frame: Frame, handled: Callable[[int], None] | None = None) -> None:
        """Append frame, split at segment ends; what cannot be journaled goes on from memory.
        handled(n) follows each part: n more records are on disk or in memory."""
        journal = self.journal
        assert journal is not None, "setup() opened it"
        while frame.count:
            part = frame
            room = journal.room(frame.count)
            if room < frame.count:
                cut = room * frame.stride
                part = Frame(0, room, frame.stride, frame.skip, frame.record_size,
                             frame.mono_to_wall_ns, frame.payload[:cut])
                frame = Frame(0, frame.count - room, frame.stride, frame.skip,
                              frame.record_size, frame.mono_to_wall_ns, frame.payload[cut:])
            else:
                frame = Frame(0, 0, 1, 0, 1, 0, b"")
            self._journal_part(journal, part)
            if handled is not None:
                handled(part.count)

    def _journal_part(self, journal: Journal, part: Frame) -> None:
        if journal.broken:
            self._unjournaled(part, "journal_errors", journal.broken)
            return
        if not journal.fits(len(part.payload)):
            self._unjournaled(part, "journal_full", f"journal {journal.directory} is full "
                              f"(SLUICE_JOURNAL_MAX_BYTES={journal.max_bytes})")
            return
        if self.journal_failing and self.monotonic() < self.journal_retry_at:
            self._unjournaled(part, "journal_errors", "")  # not every drain hits a full disk
            return
        try:
            journal.append(part)
        except JournalError as err:
            part.first_seq = 0
            self.journal_retry_at = self.monotonic() + self.paces.journal_retry_s
            self._unjournaled(part, "journal_errors", str(err))
            return
        self.io.counters.add("records_journaled", part.count)
        if self.journal_failing:
            self.journal_failing = False
            self.io.log.info("journal writes work again")

    def _unjournaled(self, frame: Frame, counter: str, why: str) -> None:
        self.io.counters.add(counter, frame.count)
        if not self.journal_failing:
            self.journal_failing = True
            self.io.log.error("%s: records go on from memory, not durable until it has room "
                              "(counted as %s)", why, counter)
        sender = self.sender
        sender.unjournaled.append(frame)
        sender.unjournaled_bytes += len(frame.payload)
        while sender.unjournaled_bytes > MAX_UNJOURNALED_BYTES:
            oldest = sender.unjournaled.popleft()
            sender.unjournaled_bytes -= len(oldest.payload)
            self.io.counters.add("records_lost", oldest.count)

    # ------------------------------------------------------------- journal -> enrich

    def send(self) -> None:
        """Offer enrich the next batches; one it cannot take waits in the feed's backlog
        (never dropped), and nothing more is read from the journal until it is taken."""
        sender, size = self.sender, self.io.settings.batch_max
        for _ in range(SENDS_PER_TURN):
            if self.feed.holding_back:
                return
            taken = sender.next_batch(size)
            if taken is None:
                return
            records, resent = taken
            if resent:
                self.io.counters.add("records_resent", len(records))
            self.feed.send(records)

    # ------------------------------------------------------------- periodic work

    def tick(self, now: float) -> None:
        if not self.attachment.filter_attached and programmed(self.config_fd):
            self._attach()
        self.drain()
        self.send()
        if now >= self.next_sweep:
            if self._sweep_flows(every_flow=now < self.pressed_until):
                self.pressed_until = now + self.paces.sweep_s
            self.next_sweep = now + (self.paces.pressed_sweep_s if now < self.pressed_until
                                     else self.paces.sweep_s)
        if now >= self.next_overflow:
            self.next_overflow = now + self.paces.overflow_s
            self._sweep_overflow()
            if self._new_flows_fast():
                self.pressed_until = now + self.paces.sweep_s
                self.next_sweep = min(self.next_sweep, now + self.paces.pressed_sweep_s)
        if now >= self.next_release:
            self.next_release = now + self.paces.release_s
            journal = self.journal
            assert journal is not None, "setup() opened it"
            deleted, unstored = journal.release()
            self.io.counters.add("journal_segments_released", deleted)
            self.io.counters.level("journal_unstored", unstored)
            self.io.counters.level("journal_bytes", journal.size)
        if now >= self.next_counters:
            self.next_counters = now + self.paces.counters_s
            self._read_kernel_counters()
            self._report_layers()

    def _read_kernel_counters(self) -> None:
        for name, value in read_counters(self.counters_fd).items():
            self.io.counters.set(f"kernel_{name}", value)
        if self.ring is not None and self.ring.skipped:
            self.io.counters.set("ring_records_skipped", self.ring.skipped)

    def accepting(self) -> bool:
        # More to send and room for it: come back at once rather than after a poll timeout.
        return self.feed.holding_back or self.sender.idle

    def _attach(self) -> None:
        created = attach_filter(self.interface, self.egress_fd)
        self.attachment.qdisc_created = created or self.attachment.qdisc_created
        self.attachment.filter_attached = True
        self.attachment.save(self.io.settings.run_dir)
        self._report_layers()
        self.io.ready = True
        self.io.log.info("classifier attached to %s egress (%s mode)", self.interface,
                         self.io.settings.mode)

    def _report_layers(self) -> None:
        """The posture as the kernel has it: mode and default action read back from the maps."""
        config = read_config(self.config_fd)
        kernel = None
        if config is not None:
            kernel = ("allow" if config.default_action == ALLOW else "deny",
                      "audit" if config.audit_mode else "enforce", config.generation)
        attached = self.attachment.filter_attached
        hooks = self.attachment.hooks
        counters = self.io.counters
        for name, report in (
                ("classifier", classifier_report(self.interface, self.io.settings.mode,
                                                 attached, kernel)),
                ("cgroup_hooks", hooks_report(self.attachment.cgroup, len(hooks), len(HOOKS))),
                ("ipv6", ipv6_report(self.interface, ipv6_disabled(self.interface),
                                     sum(h["attach_type"] in V6_HOOKS for h in hooks))),
                ("dns_redirect", self.redirect_layer),
                ("ring_buffer", ring_buffer_report(counters.get("kernel_ringbuf_full"),
                                                   counters.get("kernel_lost"),
                                                   counters.get("records_lost"),
                                                   counters.get("kernel_evicted")))):
            self.io.report_layer(name, **report)

    def _sweep_flows(self, every_flow: bool = False) -> bool:
        """Report packets still pending in flows that went quiet inside their window, or
        with every_flow in every flow: at the stop (an audit-mode stop removes the maps, and
        the packets of a flow still in its window would go with them) and while the map
        evicts flows with packets pending. True when this sweep saw such evictions."""
        now_ns = self.kernel_ns()
        tails = []
        evicting = False
        try:
            if self._nothing_pending():
                return False
            folded = read_counter(self.counters_fd, "aggregated")  # before the map: _evicted
            unclaimed = 0
            for keys, values, _ in libbpf.chunks(self.flows_fd, FlowKey, FlowState):
                # Unpacked in one pass over the chunk: most flows have nothing pending.
                for i, (last_emit, pending) in enumerate(_EMIT_AND_PENDING.iter_unpack(values)):
                    if pending == 0:
                        continue
                    key_bytes = keys[i * _FLOW_KEY_SIZE:(i + 1) * _FLOW_KEY_SIZE]
                    if not (every_flow or tail_due(key_bytes[_FLAGS_AT], last_emit, now_ns)):
                        unclaimed += pending
                        continue
                    # Claimed by the kernel, which exchanges the count for 0 as the classifier
                    # does: a packet of the flow meanwhile is reported by one of them only.
                    claimed, last = claim_tail(self.claim_fd, key_bytes)
                    if last is not None:
                        tails.append(reported_record(last, now_ns, claimed))
            evicting = self._evicted(
                folded - read_counter(self.counters_fd, "tail_taken") - unclaimed)
            self._map_read_again("map_flows")
        except OSError as err:
            self._map_read_failed("map_flows", err)
        if tails:  # what was claimed before a failure is journaled all the same
            self.io.counters.add("flow_tails_reported", len(tails))
            self._journal_records(tails)
        return evicting

    def _nothing_pending(self) -> bool:
        """Whether no flow holds a packet pending, from the kernel's counters alone: every
        packet it folded into a flow was taken by a record or a claim, or is counted as
        evicted. Then the sweep need not read the map (a flood of single-packet flows folds
        nothing). tail_taken is read first: a packet taken meanwhile only makes the figure
        larger, never hides one still pending."""
        taken = read_counter(self.counters_fd, "tail_taken")
        folded = read_counter(self.counters_fd, "aggregated")
        return folded - taken <= self.io.counters.get("kernel_evicted")

    def _new_flows_fast(self) -> bool:
        """Whether the kernel made PRESS_RECORDS records since the last look."""
        made = (read_counter(self.counters_fd, "events")
                + read_counter(self.counters_fd, "ringbuf_full"))
        fast = made - self.records_made >= PRESS_RECORDS
        self.records_made = made
        return fast

    def _evicted(self, estimate: int) -> bool:
        """Packets the LRU evicted with their flow before they were reported, as kernel_evicted.

        Every packet the kernel counted as aggregated before the map was read has since been
        taken (by a record or a claim, counted as tail_taken after the map was read), or is
        still in its flow, or was evicted with it: so the estimate never exceeds the packets
        evicted, but for a record taking packets at the instant the counter is read (between
        its exchange and its count). The lower of two sweeps' estimates is kept. True when
        the estimate grew since the last sweep: flows are being evicted with packets."""
        grew = estimate > self.eviction_estimate
        bound = min(estimate, self.eviction_estimate)
        self.eviction_estimate = estimate
        if bound <= self.io.counters.get("kernel_evicted"):
            return grew
        if not self.io.counters.get("kernel_evicted"):
            self.io.log.warning("packets of quiet flows were evicted from map_flows before "
                                "they were reported (a flood of new flows filled it): counted "
                                "as kernel_evicted, not in any record")
        self.io.counters.set("kernel_evicted", bound)
        return grew

    def _sweep_overflow(self) -> None:
        """Records the ring buffer refused, parked by the kernel: into the journal."""
        parked = []
        try:
            for _, value_bytes in libbpf.entries(self.overflow_fd, ParkKey, FlowState,
                                                 delete=True):
                state = FlowState.from_buffer_copy(value_bytes)
                if state.pending:
                    parked.append(reported_record(state.last, state.last.timestamp,
                                                  state.pending))
            self._map_read_again("map_parked")
        except OSError as err:
            self._map_read_failed("map_parked", err)
        if parked:  # taken from the kernel before a failure: journaled all the same
            self.io.counters.add("overflow_swept", len(parked))
            self._journal_records(parked)

    def _map_read_again(self, name: str) -> None:
        if name in self.maps_failing:
            self.maps_failing.discard(name)
            self.io.log.info("reading %s works again", name)

    def _map_read_failed(self, name: str, err: OSError) -> None:
        """Counted, and logged once until a sweep of that map works again; capture goes on
        draining and enforcing, and what the map still holds is read at the next sweep."""
        self.io.counters.add("map_read_errors")
        if name not in self.maps_failing:
            self.maps_failing.add(name)
            self.io.log.error("cannot read %s: %s (counted as map_read_errors; tried again at "
                              "the next sweep)", name, err.strerror or err)

    def _journal_records(self, records: list[bytes]) -> None:
        shift = self.wall_ns() - self.kernel_ns()
        self.io.counters.add("records_read", len(records))
        self._journal(Frame(0, len(records), RECORD_SIZE, 0, RECORD_SIZE, shift,
                            b"".join(records)))

    # ------------------------------------------------------------- stop

    def finish(self) -> None:
        """Into the journal, to be sent before the stop ends: the ring buffer, the parked
        records and every flow's pending packets, in their window or not (teardown calls it
        again for what comes meanwhile)."""
        self.drain()
        self._sweep_flows(every_flow=True)
        self._sweep_overflow()

    def finished(self) -> bool:
        return self.sender.idle

    def teardown(self) -> None:
        classifier, journal, cgroups = self.classifier, self.journal, self.cgroups
        if classifier is None or journal is None or cgroups is None:  # no classifier loaded
            if journal is not None:
                journal.close()
            return
        settings, ring = self.io.settings, self.ring
        try:
            if ring is not None:  # set-up got through: what the kernel holds goes on disk
                self.finish()  # again: what came since the stop's, or all of it at a deadline
                self.send()
                # The last counters file holds the kernel's final figures, however short
                # the run was since the last read.
                self._read_kernel_counters()
        finally:
            journal.close()
            if ring is not None:
                ring.close()
            cgroups.close()
            if settings.audit_mode:
                detach_hooks(self.attachment.cgroup, self.attachment.hooks)
                redirect.remove_addresses(self.attachment.redirect_addresses)
                detach_filter(self.interface, self.attachment.qdisc_created)
                self.attachment.filter_attached = False
                classifier.cleanup()
                remove_pins(settings.bpf_dir)
                Attachment.path(settings.run_dir).unlink(missing_ok=True)
                self.io.log.info("audit mode: detached from %s, removed the hooks, the DNS "
                                 "redirect and the pins", self.interface)
            else:
                self.attachment.save(settings.run_dir)
                classifier.cleanup()
                self.io.log.info("enforce mode: the hooks%s stay in place (fail closed) "
                                 "until `sluice detach`",
                                 f" and the filter on {self.interface}"
                                 if self.attachment.filter_attached else "")


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(CaptureStage(), settings, ctx=ctx, stop=stop)
