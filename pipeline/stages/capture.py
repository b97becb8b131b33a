"""capture: load the classifier, attach it once policy has programmed the maps, drain events.

Consumes: the kernel ring buffer (struct sluice_event, bpf/sluice.h).
Produces: `raw_events` batches, pushed to enrich (ipc://<run_dir>/enrich.sock).
Binds:    no inbox. Connects: enrich.
Kernel:   compiles bpf/sluice.c with bcc and pins every map under SLUICE_BPF_DIR (re-adopting
          pins a previous run left); attaches the cgroup socket hooks on SLUICE_CGROUP; puts
          the classifier on SLUICE_INTERFACE's egress only once the policy stage has marked
          the maps programmed (map_config.generation != 0), so there is no start-up window
          of false blocks.
Never blocks: a batch enrich cannot take is kept in a small backlog, then dropped and
          counted (enrich_dropped). Short records are counted (short_records) and skipped.
          Packets of a flow that stops inside its aggregation window are reported by a sweep
          of the flow map, so packet counts add up.
Stop:     in audit mode a clean stop detaches everything; in enforce mode the filter and the
          maps stay (fail closed) until `sluice detach`. The cgroup hooks always go.

Example:  SLUICE_INTERFACE=eth0 sluice run capture
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time

import zmq

from ..errors import KernelError
from ..kernel import libbpf
from ..kernel.doctor import blocking_failures
from ..kernel.loader import (HOOKS, V6_HOOKS, Attachment, attach_filter, attach_hooks,
                             cgroup_dir, detach_filter, detach_hooks, egress_interface,
                             ipv6_disabled, load_classifier, remove_pins, AGG_WINDOW_NS,
                             MIDSTREAM_WINDOW_NS)
from ..kernel.maps import read_counters
from ..kernel.structs import Config, FlowKey, FlowState
from ..loop import BaseStage, StageIO, run_stage
from ..posture import classifier_report, hooks_report, ipv6_report, ring_buffer_report
from ..record import ShortRecord, decode_record
from ..rulemaps import ALLOW
from ..settings import Settings

SWEEP_INTERVAL_S = 1.0
COUNTER_POLL_S = 1.0
FLAG_MID_STREAM = 0x01


class CaptureStage(BaseStage):
    name = "capture"

    def __init__(self) -> None:
        self.classifier = None
        self.attachment = Attachment()
        self.pending_records: list[bytes] = []
        self.next_sweep = self.next_counters = 0.0

    def setup(self, io: StageIO) -> None:
        self.io = io
        settings = io.settings
        for failure in blocking_failures(settings):
            raise KernelError(failure.line())
        self.interface = egress_interface(settings)
        self.classifier = load_classifier(settings)
        self.attachment = Attachment(interface=self.interface, bpf_dir=str(settings.bpf_dir))
        cgroup = cgroup_dir(settings)
        self.attachment.cgroup = str(cgroup)
        self.attachment.hooks = attach_hooks(self.classifier, cgroup)
        self.attachment.save(settings.run_dir)
        self.feed = io.connect_feed("enrich", backlog=256)
        ring = self.classifier.bpf[b"map_events"]
        ring.open_ring_buffer(self._on_record)
        manager = self.classifier.bpf._ringbuf_manager
        io.watch_fd(libbpf.lib().ring_buffer__epoll_fd(manager), self.drain)
        self.config_fd = self.classifier.map_fd("map_config")
        self.counters_fd = self.classifier.map_fd("map_counters")
        self.flows_fd = self.classifier.map_fd("map_flows")
        self._report_layers()
        io.log.info("loaded classifier, maps pinned in %s, %d cgroup hook(s) on %s; "
                    "waiting for policy to program the maps before attaching to %s",
                    settings.bpf_dir, len(self.attachment.hooks), cgroup, self.interface)

    # ------------------------------------------------------------- ring buffer

    def _on_record(self, _ctx, data, size) -> int:
        self.pending_records.append(ctypes.string_at(data, size))
        return 0

    def drain(self) -> None:
        """Consume every record in the ring buffer and push them in batches."""
        self.classifier.bpf.ring_buffer_consume()
        if not self.pending_records:
            return
        records, self.pending_records = self.pending_records, []
        offset = time.time_ns() - time.monotonic_ns()
        events = []
        for data in records:
            try:
                events.append(decode_record(data, offset))
            except ShortRecord:
                self.io.counters.add("short_records")
        self.io.counters.add("records_read", len(records))
        self._push(events)

    def _push(self, events: list) -> None:
        size = self.io.settings.batch_max
        for start in range(0, len(events), size):
            self.feed.send(events[start:start + size])

    # ------------------------------------------------------------- periodic work

    def tick(self, now: float) -> None:
        if not self.attachment.filter_attached and self._maps_programmed():
            self._attach()
        self.drain()
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_INTERVAL_S
            self._sweep_flows()
        if now >= self.next_counters:
            self.next_counters = now + COUNTER_POLL_S
            for name, value in read_counters(self.counters_fd).items():
                self.io.counters.set(f"kernel_{name}", value)
            self._report_layers()

    def _maps_programmed(self) -> bool:
        config = Config()
        return libbpf.lookup(self.config_fd, ctypes.c_uint32(0), config) and config.generation != 0

    def _attach(self) -> None:
        self.attachment.qdisc_created = attach_filter(self.interface, self.classifier.egress.fd)
        self.attachment.filter_attached = True
        self.attachment.save(self.io.settings.run_dir)
        self._report_layers()
        self.io.ready = True
        self.io.log.info("classifier attached to %s egress (%s mode)", self.interface,
                         self.io.settings.mode)

    def _report_layers(self) -> None:
        """The posture as the kernel has it: mode and default action read back from the maps."""
        config = Config()
        kernel = None
        if libbpf.lookup(self.config_fd, ctypes.c_uint32(0), config):
            kernel = ("allow" if config.default_action == ALLOW else "deny",
                      "audit" if config.audit_mode else "enforce", config.generation)
        attached = self.attachment.filter_attached
        hooks = self.attachment.hooks
        for name, report in (
                ("classifier", classifier_report(self.interface, self.io.settings.mode,
                                                 attached, kernel)),
                ("cgroup_hooks", hooks_report(self.attachment.cgroup, len(hooks), len(HOOKS))),
                ("ipv6", ipv6_report(self.interface, ipv6_disabled(self.interface),
                                     sum(h["attach_type"] in V6_HOOKS for h in hooks))),
                ("ring_buffer", ring_buffer_report(self.io.counters.get("kernel_ringbuf_full")))):
            self.io.report_layer(name, **report)

    def _sweep_flows(self) -> None:
        """Report packets still pending in flows that went quiet inside their window."""
        now_ns = time.monotonic_ns()
        offset = time.time_ns() - now_ns
        tails = []
        state = FlowState()
        for key in libbpf.keys(self.flows_fd, FlowKey):
            if not libbpf.lookup(self.flows_fd, key, state) or state.pending == 0:
                continue
            window = MIDSTREAM_WINDOW_NS if key.flags & FLAG_MID_STREAM else AGG_WINDOW_NS
            if now_ns - state.last_emit < window:
                continue
            packets = state.pending
            libbpf.delete(self.flows_fd, key)  # the flow's next packet starts a fresh record
            record = bytearray(bytes(state.last))
            struct.pack_into("<Q", record, 48, now_ns)
            struct.pack_into("<I", record, 60, packets)
            tails.append(decode_record(bytes(record), offset))
        if tails:
            self.io.counters.add("flow_tails_reported", len(tails))
            self._push(tails)

    # ------------------------------------------------------------- stop

    def teardown(self) -> None:
        if self.classifier is None:
            return
        settings = self.io.settings
        try:
            self.drain()
            self._sweep_flows()
        finally:
            detach_hooks(self.attachment.cgroup, self.attachment.hooks)
            self.attachment.hooks = []
            if settings.audit_mode:
                detach_filter(self.interface, self.attachment.qdisc_created)
                self.attachment.filter_attached = False
                self.classifier.cleanup()
                remove_pins(settings.bpf_dir)
                Attachment.path(settings.run_dir).unlink(missing_ok=True)
                self.io.log.info("audit mode: detached from %s and removed pins", self.interface)
            else:
                self.attachment.save(settings.run_dir)
                self.classifier.cleanup()
                if self.attachment.filter_attached:
                    self.io.log.info("enforce mode: filter on %s stays in place (fail closed) "
                                     "until `sluice detach`", self.interface)


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(CaptureStage(), settings, ctx=ctx, stop=stop)
