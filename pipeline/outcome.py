"""The outcome of one enriched event: the seed's processEvent, as a pure function.

Exactly one of, in this order (reference §2.4): connection_allowed (kernel allowed it),
protocol_blocked (the seed's protocol-block shape; tested before late-allow because a denied
non-first UDP fragment has both shapes), connection_late_allowed (the late-allow callback
opened the maps for it), connection_blocked. Blocks are also notices for notify.
The record is normalized here, once, where it is created.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .audit import AuditEvent, AuditEventType, normalize
from .containers import container_of
from .events import EnrichedEvent, protocol_name

# (dst_ip, dst_port, protocol name lowercased, hostname) -> auto-allowed type or "".
AutoAllowedType = Callable[[str, int, str, str], str]
# The event -> the allow rule's value when late-allow opened the maps for it, else None.
LateAllow = Callable[[EnrichedEvent], str | None]


@dataclasses.dataclass(slots=True)
class Outcome:
    record: AuditEvent
    notify: bool  # a block: notify sends one notice per destination


def _no_auto_type(_ip: str, _port: int, _proto: str, _host: str) -> str:
    return ""


def _no_late_allow(_event: EnrichedEvent) -> None:
    return None


def decide(event: EnrichedEvent, *, audit_mode: bool, event_id: str, host: str,
           auto_allowed_type: AutoAllowedType = _no_auto_type,
           late_allow: LateAllow = _no_late_allow) -> Outcome:
    record = AuditEvent(
        timestamp=event.timestamp_ns, event_type="", src_ip=event.src_ip, dst_ip=event.dst_ip,
        dst_hostname=event.dst_hostname, dst_port=event.dst_port, protocol=event.protocol,
        process=event.comm, pid=event.pid, cname_chain=list(event.cname_chain),
        packets=event.packets, event_id=event_id, host=host, seq=event.seq,
        cgroup=event.cgroup, container=container_of(event.cgroup))
    notify = False
    if event.allowed:
        record.event_type = AuditEventType.CONNECTION_ALLOWED.value
        record.auto_allowed_type = auto_allowed_type(
            event.dst_ip, event.dst_port, _rule_protocol(event.ip_proto), event.dst_hostname)
    elif event.is_protocol_block:
        record.event_type = AuditEventType.PROTOCOL_BLOCKED.value
        record.protocol = protocol_name(event.dst_port)
        record.dst_port = 0
        notify = True
    elif (rule := late_allow(event)) is not None:
        record.event_type = AuditEventType.CONNECTION_LATE_ALLOWED.value
        record.matched_rule = rule
    else:
        record.event_type = AuditEventType.CONNECTION_BLOCKED.value
        record.mid_stream = event.mid_stream
        notify = True
    return Outcome(normalize(record, audit_mode, event.timestamp_ns), notify)


def _rule_protocol(ip_proto: int) -> str:
    """The rule-language protocol of an L4 number; unknown ones overlap only `all` rules."""
    return {6: "tcp", 17: "udp", 1: "icmp"}.get(ip_proto, "all")
