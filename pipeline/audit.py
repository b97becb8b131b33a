"""Audit records: the seed's AuditEventType and AuditEvent, and their normalization.

An AuditEvent is created once (policy, dns, the start-up scan), normalized there, and travels
to persist as an `audit_records` message (schemas/audit_records.json). Field names are the
seed's JSON names; sluice adds `packets`, `event_id` and `host`.
"""

from __future__ import annotations

import dataclasses
import enum

from .wire import WireRecord, register


class AuditEventType(str, enum.Enum):
    CONNECTION_BLOCKED = "connection_blocked"
    CONNECTION_ALLOWED = "connection_allowed"
    CONNECTION_LATE_ALLOWED = "connection_late_allowed"
    PROTOCOL_BLOCKED = "protocol_blocked"
    DNS_BLOCKED = "dns_blocked"
    EXISTING_CONNECTION = "existing_connection"

    def is_connection_allowed(self) -> bool:
        """An allow outcome for a TCP/UDP connection: allowed, or late-allowed on retry."""
        return self in (AuditEventType.CONNECTION_ALLOWED, AuditEventType.CONNECTION_LATE_ALLOWED)


# Types whose would_deny/blocked flags are whatever their creator set (reference §2.5).
FLAG_EXEMPT_TYPES = frozenset({
    "connection_allowed", "connection_late_allowed", "existing_connection",
    "step_boundary", "container_attribution", "cgroup_would_block",
})


@register
@dataclasses.dataclass(slots=True)
class AuditEvent(WireRecord):
    KIND = "audit_records"

    timestamp: int            # UTC nanoseconds since the epoch; 0 = "now" at normalization
    event_type: str
    src_ip: str = ""
    dst_ip: str = ""
    dst_hostname: str = ""
    dst_port: int = 0
    protocol: str = ""
    process: str = ""
    pid: int = 0
    matched_rule: str = ""
    auto_allowed_type: str = ""
    cname_chain: list[str] = dataclasses.field(default_factory=list)
    mid_stream: bool = False
    would_deny: bool = False  # true in audit mode: would have been denied
    blocked: bool = False     # true in enforce mode: actually blocked
    packets: int = 1          # packets this record stands for (kernel flood aggregation)
    event_id: str = ""        # unique: a retried write never duplicates a row
    host: str = ""


def normalize(event: AuditEvent, audit_mode: bool, now_ns: int) -> AuditEvent:
    """The seed's AuditLogger.LogEvent rules, applied once where a record is created."""
    if event.timestamp == 0:
        event.timestamp = now_ns
    if event.event_type not in FLAG_EXEMPT_TYPES:
        event.would_deny = audit_mode
        event.blocked = not audit_mode
    return event
