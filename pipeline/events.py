"""The records that flow from capture to policy.

RawEvent is a decoded kernel record (capture -> enrich, and what a recording holds);
EnrichedEvent adds what enrich knows about the destination (enrich -> policy).
Their wire form is schemas/raw_events.json and schemas/enriched_events.json.
"""

from __future__ import annotations

import dataclasses

from .wire import WireRecord, register

FLAG_MID_STREAM = 0x01  # a denied TCP segment of an established flow
FLAG_FRAGMENT = 0x02    # a non-first fragment: ports are 0/0

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

_PROTOCOL_NAMES = {
    1: "ICMP", 2: "IGMP", 6: "TCP", 17: "UDP", 41: "IPv6-in-IPv4", 47: "GRE", 50: "ESP",
    51: "AH", 58: "ICMPv6", 89: "OSPF", 103: "PIM", 132: "SCTP",
}


def protocol_name(number: int) -> str:
    """cargowall's names for L4 protocol numbers (reference §2.4)."""
    return _PROTOCOL_NAMES.get(number) or f"Protocol-{number}"


@register
@dataclasses.dataclass(slots=True)
class RawEvent(WireRecord):
    KIND = "raw_events"
    VERSION = 2

    ip_version: int
    allowed: bool
    ip_proto: int
    flags: int
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    timestamp_ns: int   # wall clock, UTC nanoseconds (converted from the kernel's monotonic time)
    pid: int
    comm: str
    packets: int
    event_id: str       # "<journal id>-<seq>" for a journaled kernel record, else ""
    seq: int            # its number in capture's journal, 0 when not journaled

    @property
    def is_protocol_block(self) -> bool:
        """The seed's protocol-block shape (reference §1.6)."""
        return not self.allowed and self.src_port == 0 and self.dst_port < 256

    @property
    def mid_stream(self) -> bool:
        return bool(self.flags & FLAG_MID_STREAM)


@register
@dataclasses.dataclass(slots=True)
class EnrichedEvent(RawEvent):
    """A raw event's fields, then what enrich knows of the destination."""

    KIND = "enriched_events"

    protocol: str          # name of ip_proto
    dst_hostname: str      # "" when unknown
    cname_chain: list[str]  # CNAME origin first, when the name came through a chain

    @classmethod
    def from_raw(cls, raw: RawEvent, hostname: str = "", cname_chain: list[str] | None = None):
        return cls(*raw.to_wire(), protocol_name(raw.ip_proto), hostname, cname_chain or [])


@register
@dataclasses.dataclass(slots=True)
class DnsMapping(WireRecord):
    """dns -> enrich: a name resolved through the proxy (what enrich names addresses by)."""

    KIND = "dns_mappings"

    name: str               # queried name, lowercased, no trailing dot
    ips: list[str]          # A/AAAA answers, address text
    ttl: int                # seconds
    cname_chain: list[str]  # origin first when the name came through a CNAME chain
    timestamp_ns: int


@register
@dataclasses.dataclass(slots=True)
class AllowRequest(WireRecord):
    """dns -> policy (REQ/REP): open the maps for a resolved name before its answer is sent."""

    KIND = "allow_requests"

    request_id: str
    name: str               # the name whose rules apply: the query, or a CNAME chain's origin
    ips: list[str]
    ttl: int
    cname_chain: list[str]
    timestamp_ns: int


@register
@dataclasses.dataclass(slots=True)
class AllowReply(WireRecord):
    """policy -> dns: the answer may be released once ok is true."""

    KIND = "allow_replies"

    request_id: str
    ok: bool                # the maps hold what the rules say for every address
    allowed_ips: list[str]  # addresses the maps now allow for this name
    error: str              # why ok is false ("" when ok)


@register
@dataclasses.dataclass(slots=True)
class Notice(WireRecord):
    """policy -> notify: one blocked attempt (notify keeps one per destination)."""

    KIND = "notices"

    event_type: str         # connection_blocked or protocol_blocked
    hostname: str
    ip: str
    port: int               # destination port; the protocol number for protocol blocks
    protocol: str
    process: str
    pid: int
    timestamp_ns: int
    mode: str               # audit or enforce
