"""policy: program the firewall maps from the policy, and decide each event's outcome.

Consumes: `enriched_events` batches on ipc://<run_dir>/policy.sock; `allow_requests` from
          the dns stage on the REP socket policy-allow.sock (when the topology has it),
          served ahead of the event backlog. This stage's thread is real-time while dns
          has lent it that for a request (pipeline/lending.py), ordinary otherwise.
Produces: `audit_records` (one per event, normalized here, once; existing_connection and
          reconciled connection_late_allowed records too) to persist; a `notices` record
          per connection_blocked and protocol_blocked outcome to notify, never waiting for it.
Binds:    policy.sock (and policy-allow.sock). Connects: persist, notify.
Kernel:   the single writer of the firewall maps. Once capture has pinned them under
          SLUICE_BPF_DIR it writes the default action, the mode, the static rules, the
          start-up auto-allows (the DNS upstream on 53/udp and 53/tcp; cloud metadata when
          SLUICE_AUTO_ALLOW_CLOUD_METADATA) and the connections already open, then bumps
          map_config.generation: the signal capture waits for before attaching. A restarted
          policy re-adopts the pinned maps and moves them by a diff (no empty-allowlist window).
Names:    an event enrich could not name, for an address this stage opened for a DNS answer
          that is still live, gets that answer's name and CNAME chain (the event reached
          enrich before the answer's mapping did; pipeline/names/answers.py), counted as
          named_by_answers.
Late-allow: a blocked TCP/UDP event whose hostname an allow rule matches gets its address
          written for exactly that rule's ports (deny side first, CIDR conflicts respected)
          and is recorded connection_late_allowed when its own port is covered: the pure
          decision (pipeline/firewall/outcome.py) plans the writes, this stage applies them.
Reload:   when the policy file changes, or on SIGHUP (pipeline/livepolicy.py): a valid policy
          replaces the old one by a diff of the maps; an invalid one is logged in one line and
          changes nothing (counted: policy_reloads, policy_reload_failures).
Start:    a policy that does not load stops the stage with one line naming the file, the
          place and the problem.
Counters: besides the inboxes', the feeds' and those above: existing_connections,
          allow_requests (and _rejected), late_allowed_by_dns, recent_blocks (blocks kept
          for late-allow) and recent_blocks_refused (new blocks not kept because all 4,096
          entries were live, as a scan leaves them for 5 minutes: logged the first time).
Bad input: a malformed message or record is counted and skipped (logged once per kind).

Example:  SLUICE_POLICY=/etc/sluice/policy.json sluice run policy
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Callable

import zmq

from .. import messages
from ..names.answers import AnswerNames
from ..audit.records import AuditEvent, existing_connection_record, normalize
from ..events import AllowReply, AllowRequest
from ..firewall.writer import Firewall, apply_existing_connection
from ..firewall.opening import allow_answer, write_plan
from ..kernel.maps import KernelRuleMaps, pins_present
from ..livepolicy import LivePolicy
from ..loop import BaseStage, StageIO, batched, run_stage
from ..firewall.outcome import decide
from ..policy.existing import gate_existing_connection, scan_connections
from ..hostfiles import HostFiles
from ..firewall.recentblocks import RecentBlocks, late_allowed_record
from ..rulemaps import RuleMaps
from ..settings import Settings



# Allow requests waiting on the REP inbox are answered between every this many events.
REQUEST_CHECK_EVERY = 32
MAPS_RETRY_S = 0.1  # how often policy looks for the maps capture pins at its start


class EventIds:
    """Unique audit event ids: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.count = 0

    def next(self) -> str:
        self.count += 1
        # sorts in creation order: sequential index inserts
        return f"{self.prefix}-{self.count:012x}"


class PolicyStage(BaseStage):
    name = "policy"

    def __init__(self, open_maps: Callable[[Settings], RuleMaps | None] | None = None,
                 files: HostFiles | None = None, clock: Callable[[], int] = time.time_ns,
                 recent: RecentBlocks | None = None) -> None:
        self.open_maps = open_maps or _open_kernel_maps
        self.files = files or HostFiles()
        self.clock = clock
        self.firewall: Firewall | None = None
        self.ids = EventIds()
        self.recent = RecentBlocks() if recent is None else recent
        self.answers = AnswerNames()

    def setup(self, io: StageIO) -> None:
        self.io = io
        self.settings = io.settings
        self.live = LivePolicy(io, self._apply, self.files)
        self.host = self.settings.host_name
        io.bind_inboxes()
        feeds = io.connect_feeds()
        self.persist, self.notify = feeds["audit_records"], feeds["notices"]
        io.report_layer("policy", "pending", f"{self.policy.source}: loaded, waiting for "
                        f"capture's maps in {self.settings.bpf_dir}", **policy_facts(self.policy))
        io.log.info("loaded %r (%s mode); waiting for capture's maps in %s", self.policy,
                    self.settings.mode, self.settings.bpf_dir)
        io.reactor.after(0, self._look_for_maps)

    # ------------------------------------------------------------- maps

    def _look_for_maps(self) -> None:
        maps = self.open_maps(self.settings)
        if maps is None:
            self.io.reactor.after(MAPS_RETRY_S, self._look_for_maps)
        else:
            self._program(maps)

    @property
    def policy(self):
        return self.live.current

    def _program(self, maps: RuleMaps) -> None:
        firewall = Firewall(maps)
        firewall.program(self.policy, self.settings.audit_mode)
        self.firewall = firewall
        if self.settings.allow_existing_connections:
            self._allow_existing_connections(firewall)
        self._report_programmed(self.policy, firewall.mark_programmed())
        self.io.ready = True
        self.io.log.info("maps programmed: default %s, %d rule(s), %s mode",
                         self.policy.default_action, len(self.policy.rules), self.settings.mode)

    def _allow_existing_connections(self, firewall: Firewall) -> None:
        """Keep connections opened before sluice started (reference §6.3)."""
        read = self.files.read
        remotes = scan_connections(read("/proc/net/tcp"), read("/proc/net/tcp6"),
                                   read("/proc/net/udp"), read("/proc/net/udp6"))
        records = []
        for ip, observed in remotes.items():
            gate = gate_existing_connection(self.policy, ip, observed)
            if apply_existing_connection(firewall, gate):
                records.append(self._record(existing_connection_record(
                    ip, gate.dst_hostname, gate.matched_rule, gate.allowed,
                    gate.auto_allowed_type)))
        self._send(records)
        self.io.counters.add("existing_connections", len(remotes))

    def _apply(self, policy) -> None:
        """A reloaded policy: the maps move to it by a diff (before it is current)."""
        if self.firewall is not None:
            self.firewall.program(policy, self.settings.audit_mode)
            # A new generation tells readers of the maps (the DNS proxy's record of what it
            # already had opened) that entries may have been removed.
            self._report_programmed(policy, self.firewall.mark_programmed())

    def hangup(self) -> None:
        self.live.reload("SIGHUP")

    def _report_programmed(self, policy, generation: int) -> None:
        facts = policy_facts(policy)
        auto = ", ".join(f"{n} {kind}" for kind, n in facts["auto_allowed"].items())
        self.io.report_layer(
            "policy", "on", f"{policy.source}: {len(policy.rules)} rule(s), default "
            f"{policy.default_action}{f' (auto-allowed: {auto})' if auto else ''}, "
            f"generation {generation}", generation=generation, **facts)


    # ------------------------------------------------------------- events

    def handle(self, inbox: str, kind: str, records: list) -> None:
        audit_mode = self.settings.audit_mode
        policy, firewall = self.policy, self.firewall
        out, notices = [], []
        now = self.clock()
        for n, event in enumerate(records, 1):
            if n % REQUEST_CHECK_EVERY == 0:
                self.io.serve_requests()  # a DNS answer never waits for a whole batch
            if not event.dst_hostname and (named := self.answers.name_of(event.dst_ip, now)):
                event.dst_hostname, event.cname_chain = named
                self.io.counters.add("named_by_answers")
            outcome = decide(event, policy, audit_mode=audit_mode,
                             event_id=event.event_id or self.ids.next(), host=self.host)
            if outcome.late_allow is not None:
                outcome = outcome.settled(write_plan(firewall, outcome.late_allow))
            self.recent.remember(outcome.record, now)
            out.append(outcome.record)
            if outcome.notify:
                notices.append(outcome.notice(event.dst_port, self.settings.mode))
        self._send(out)
        self.notify.send(notices)
        self._count_recent()

    def _count_recent(self) -> None:
        """The blocks kept for late-allow, and the new ones refused while every entry is live
        (a scan fills them for their 5 minutes: a block then is never re-labeled)."""
        recent, counters = self.recent, self.io.counters
        counters.level("recent_blocks", recent.size)
        if recent.dropped and not counters.get("recent_blocks_refused"):
            self.io.log.warning("recent blocks are full (%d live): blocks of new destinations "
                                "are not kept for late-allow until entries expire (counted as "
                                "recent_blocks_refused)", recent.size)
        counters.set("recent_blocks_refused", recent.dropped)

    def reply(self, inbox: str, kind: str, records: list) -> bytes:
        """An allow request from dns: the maps first, then the answer may be released."""
        if len(records) != 1:
            self.io.counters.add("allow_requests_rejected")
            return b""  # one request per message; an empty frame means "rejected"
        return messages.encode([self._allow(records[0])])

    def _allow(self, request: AllowRequest) -> AllowReply:
        if self.firewall is None:
            return AllowReply(request.request_id, False, [], "the maps are not programmed yet")
        writes = allow_answer(self.policy, self.firewall, request.name, request.ips)
        verdict, now = writes.verdict, self.clock()
        self.answers.opened(request.name, request.cname_chain, request.ips, request.ttl, now)
        reconciled = []
        for ip in writes.allowed_ips:
            for block in self.recent.take(ip, verdict.allow_ports, verdict.deny_ports,
                                          verdict.has_deny, now):
                reconciled.append(self._record(late_allowed_record(
                    block, request.name, verdict.allow_rule, request.cname_chain)))
        self._send(reconciled)
        self.io.counters.add("allow_requests")
        self.io.counters.add("late_allowed_by_dns", len(reconciled))
        return AllowReply(request.request_id, True, writes.allowed_ips, "")

    def _record(self, record: AuditEvent) -> AuditEvent:
        record.event_id, record.host = self.ids.next(), self.host
        return normalize(record, self.settings.audit_mode, self.clock())

    def _send(self, records: list[AuditEvent]) -> None:
        for batch in batched(records, self.settings.batch_max):
            self.persist.send(batch)

    def teardown(self) -> None:
        if self.firewall is not None:
            close = getattr(self.firewall.maps, "close", None)
            if close:
                close()


def policy_facts(policy) -> dict:
    """What the posture shows of a policy: its source, size and the rules sluice added."""
    auto = collections.Counter(rule.auto_added_type for rule in policy.auto_rules)
    return {"source": policy.source, "rules": len(policy.rules),
            "default_action": policy.default_action, "auto_allowed": dict(sorted(auto.items()))}


def _open_kernel_maps(settings: Settings) -> RuleMaps | None:
    if not pins_present(settings.bpf_dir):
        return None
    return KernelRuleMaps(settings.bpf_dir)


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(PolicyStage(), settings, ctx=ctx, stop=stop)
