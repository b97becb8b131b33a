"""The outcome of one enriched event: the seed's processEvent, as a pure function.

Exactly one of, in this order (reference §2.4): connection_allowed (kernel allowed it),
protocol_blocked (the seed's protocol-block shape; tested before late-allow because a denied
non-first UDP fragment has both shapes), connection_late_allowed (late-allow's writes open
the maps for its own port), connection_blocked. Blocks are also notices for notify.
The record is normalized here, once, where it is created.

Nothing here writes the maps: an outcome carries the late-allow plan (firewall/opening.py) and
the outcome that stands if the policy stage cannot write it (`settled`).
"""

from __future__ import annotations

import dataclasses

from ..audit.records import AuditEvent, AuditEventType, normalize
from ..containers import container_of
from ..events import EnrichedEvent, Notice, protocol_name
from .opening import LateAllowPlan, plan_late_allow
from ..policy.autoallow import get_auto_allowed_type
from ..policy.model import Policy


@dataclasses.dataclass(slots=True)
class Outcome:
    record: AuditEvent
    notify: bool  # a block: notify sends one notice per destination
    late_allow: LateAllowPlan | None = None  # map writes for the policy stage to apply
    unwritten: Outcome | None = None  # what stands when they cannot be written

    def settled(self, written: bool) -> Outcome:
        """The outcome once the late-allow writes were applied (written) or failed."""
        return self if written or self.unwritten is None else self.unwritten

    def notice(self, port: int, mode: str) -> Notice:
        """The notice of a block for notify; port is the event's own (a protocol block's
        record has it cleared, its notice carries the protocol number)."""
        r = self.record
        return Notice(r.event_type, r.dst_hostname, r.dst_ip, port, r.protocol, r.process,
                      r.pid, r.timestamp, mode)


def decide(event: EnrichedEvent, policy: Policy, *, audit_mode: bool, event_id: str,
           host: str) -> Outcome:
    now = event.timestamp_ns
    record = _record(event, event_id, host)
    if event.allowed:
        record.event_type = AuditEventType.CONNECTION_ALLOWED.value
        record.auto_allowed_type = get_auto_allowed_type(
            policy, event.dst_ip, event.dst_port, _rule_protocol(event.ip_proto),
            event.dst_hostname)
        return Outcome(normalize(record, audit_mode, now), False)
    if event.is_protocol_block:
        record.event_type = AuditEventType.PROTOCOL_BLOCKED.value
        record.protocol = protocol_name(event.dst_port)
        record.dst_port = 0
        return Outcome(normalize(record, audit_mode, now), True)
    record.event_type = AuditEventType.CONNECTION_BLOCKED.value
    record.mid_stream = event.mid_stream
    blocked = Outcome(normalize(record, audit_mode, now), True)
    plan = plan_late_allow(policy, event)
    if plan is None or not plan.covers:
        blocked.late_allow = plan  # written all the same: the rule's own ports open
        return blocked
    late = _record(event, event_id, host)
    late.event_type = AuditEventType.CONNECTION_LATE_ALLOWED.value
    late.matched_rule = plan.rule
    return Outcome(normalize(late, audit_mode, now), False, plan, blocked)


def _record(event: EnrichedEvent, event_id: str, host: str) -> AuditEvent:
    return AuditEvent(
        timestamp=event.timestamp_ns, event_type="", src_ip=event.src_ip, dst_ip=event.dst_ip,
        dst_hostname=event.dst_hostname, dst_port=event.dst_port, protocol=event.protocol,
        process=event.comm, pid=event.pid, cname_chain=list(event.cname_chain),
        packets=event.packets, event_id=event_id, host=host, seq=event.seq,
        cgroup=event.cgroup, container=container_of(event.cgroup))


def _rule_protocol(ip_proto: int) -> str:
    """The rule-language protocol of an L4 number; unknown ones overlap only `all` rules."""
    return {6: "tcp", 17: "udp", 1: "icmp"}.get(ip_proto, "all")
