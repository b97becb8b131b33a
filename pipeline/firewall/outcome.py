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


# The types as plain strings: an enum member's .value is a descriptor call, once per event.
_ALLOWED = AuditEventType.CONNECTION_ALLOWED.value
_PROTOCOL_BLOCKED = AuditEventType.PROTOCOL_BLOCKED.value
_BLOCKED = AuditEventType.CONNECTION_BLOCKED.value
_LATE_ALLOWED = AuditEventType.CONNECTION_LATE_ALLOWED.value


def decide(event: EnrichedEvent, policy: Policy, *, audit_mode: bool, event_id: str,
           host: str) -> Outcome:
    now = event.timestamp_ns
    if event.allowed:
        record = _record(event, _ALLOWED, event_id, host)
        record.auto_allowed_type = get_auto_allowed_type(
            policy, event.dst_ip, event.dst_port, _rule_protocol(event.ip_proto),
            event.dst_hostname)
        return Outcome(normalize(record, audit_mode, now), False)
    if event.is_protocol_block:
        record = _record(event, _PROTOCOL_BLOCKED, event_id, host)
        record.protocol = protocol_name(event.dst_port)
        record.dst_port = 0
        return Outcome(normalize(record, audit_mode, now), True)
    record = _record(event, _BLOCKED, event_id, host)
    record.mid_stream = event.mid_stream
    blocked = Outcome(normalize(record, audit_mode, now), True)
    plan = plan_late_allow(policy, event)
    if plan is None or not plan.covers:
        blocked.late_allow = plan  # written all the same: the rule's own ports open
        return blocked
    late = _record(event, _LATE_ALLOWED, event_id, host)
    late.matched_rule = plan.rule
    return Outcome(normalize(late, audit_mode, now), False, plan, blocked)


def _record(event: EnrichedEvent, event_type: str, event_id: str, host: str) -> AuditEvent:
    # Positional, in AuditEvent's field order: a sixth of the cost of keywords, per event.
    return AuditEvent(
        event.timestamp_ns, event_type, event.src_ip, event.dst_ip, event.dst_hostname,
        event.dst_port, event.protocol, event.comm, event.pid, "", "", list(event.cname_chain),
        False, False, False, event.packets, event_id, host, event.seq, event.cgroup,
        container_of(event.cgroup))


def _rule_protocol(ip_proto: int) -> str:
    """The rule-language protocol of an L4 number; unknown ones overlap only `all` rules."""
    return {6: "tcp", 17: "udp", 1: "icmp"}.get(ip_proto, "all")
