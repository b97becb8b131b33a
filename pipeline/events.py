"""The records that flow from capture to policy.

RawEvent is a decoded kernel record (capture -> enrich, and what a recording holds);
EnrichedEvent adds what enrich knows about the destination (enrich -> policy).
Their wire form is schemas/raw_events.json and schemas/enriched_events.json.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from .wire import (ADDRESS, ADDRESSES, COMM, I64, IP_VERSION, MODE, NAME, NAMES, PROCESS,
                   SHORT, TEXT, U8, U16, U32, Limit, WireRecord, register)

BLOCK_TYPES = ("connection_blocked", "protocol_blocked")

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

    ip_version: Annotated[int, IP_VERSION]
    allowed: bool
    ip_proto: Annotated[int, U8]
    flags: Annotated[int, U8]
    src_ip: Annotated[str, ADDRESS]
    dst_ip: Annotated[str, ADDRESS]
    src_port: Annotated[int, U16]
    dst_port: Annotated[int, U16]
    timestamp_ns: Annotated[int, I64]  # wall clock, UTC ns (from the kernel's monotonic time)
    pid: Annotated[int, U32]
    comm: Annotated[str, COMM]
    packets: Annotated[int, I64]
    event_id: Annotated[str, Limit(max_len=128)]  # "<journal id>-<seq>" if journaled, else ""
    seq: Annotated[int, I64]  # its number in capture's journal, 0 when not journaled

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

    protocol: Annotated[str, SHORT]       # name of ip_proto
    dst_hostname: Annotated[str, NAME]    # "" when unknown
    cname_chain: Annotated[list[str], NAMES]  # CNAME origin first, when it came through one

    @classmethod
    def from_raw(cls, raw: RawEvent, hostname: str = "",
                 cname_chain: list[str] | None = None) -> EnrichedEvent:
        return cls(*(*raw.to_wire(), protocol_name(raw.ip_proto), hostname, cname_chain or []))


@register
@dataclasses.dataclass(slots=True)
class DnsMapping(WireRecord):
    """dns -> enrich: a name resolved through the proxy (what enrich names addresses by)."""

    KIND = "dns_mappings"

    name: Annotated[str, NAME]                # queried name, lowercased, no trailing dot
    ips: Annotated[list[str], ADDRESSES]      # A/AAAA answers, address text
    ttl: Annotated[int, U32]                  # seconds
    cname_chain: Annotated[list[str], NAMES]  # origin first when it came through a chain
    timestamp_ns: Annotated[int, I64]


@register
@dataclasses.dataclass(slots=True)
class AllowRequest(WireRecord):
    """dns -> policy (REQ/REP): open the maps for a resolved name before its answer is sent."""

    KIND = "allow_requests"

    request_id: Annotated[str, SHORT]
    name: Annotated[str, NAME]  # the name whose rules apply: the query, or a chain's origin
    ips: Annotated[list[str], ADDRESSES]
    ttl: Annotated[int, U32]
    cname_chain: Annotated[list[str], NAMES]
    timestamp_ns: Annotated[int, I64]


@register
@dataclasses.dataclass(slots=True)
class AllowReply(WireRecord):
    """policy -> dns: the answer may be released once ok is true."""

    KIND = "allow_replies"

    request_id: Annotated[str, SHORT]
    ok: bool                                     # the maps hold what the rules say
    allowed_ips: Annotated[list[str], ADDRESSES]  # addresses the maps now allow for the name
    error: Annotated[str, TEXT]                  # why ok is false ("" when ok)


@register
@dataclasses.dataclass(slots=True)
class Notice(WireRecord):
    """policy -> notify: one blocked attempt (notify keeps one per destination)."""

    KIND = "notices"

    event_type: Annotated[str, Limit(choices=BLOCK_TYPES)]
    hostname: Annotated[str, NAME]
    ip: Annotated[str, ADDRESS]
    port: Annotated[int, U16]  # destination port; the protocol number for protocol blocks
    protocol: Annotated[str, SHORT]
    process: Annotated[str, PROCESS]
    pid: Annotated[int, U32]
    timestamp_ns: Annotated[int, I64]
    mode: Annotated[str, MODE]


@register
@dataclasses.dataclass(slots=True)
class DeliveredDestination(WireRecord):
    """notify -> persist: a destination alerted on (alone or in a delivered summary), so a
    restarted notify does not alert it again. persist, the store's one writer, keeps it."""

    KIND = "delivered_destinations"

    host: Annotated[str, Limit(max_len=255)]
    destination: Annotated[str, Limit(max_len=1100)]  # `<hostname or ip>:<port>`
    hostname: Annotated[str, NAME]
    ip: Annotated[str, ADDRESS]
    port: Annotated[int, U16]
    protocol: Annotated[str, SHORT]
    first_seen_ns: Annotated[int, I64]
    delivered_ns: Annotated[int, I64]
