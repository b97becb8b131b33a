"""The records that flow between the stages (audit records: pipeline/audit/records.py).

RawEvent is a decoded kernel record (capture -> enrich, and what a recording holds);
EnrichedEvent adds what enrich knows about the destination (enrich -> policy).
Their wire form is schemas/raw_events.json and schemas/enriched_events.json. FeedEnd is
the last message a stopping stage sends on each feed (pipeline/stopping.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .topology import STAGES
from .wire import (ADDRESS, ADDRESSES, COMM, EVENT_ID, HOST, I64, IP_VERSION, MODE, NAME, NAMES,
                   PROCESS, SHORT, TEXT, U8, U16, U32, Limit, WireRecord, limited, register)

BLOCK_TYPES = ("connection_blocked", "protocol_blocked")
if TYPE_CHECKING:  # what the checker needs to know; at run time, the limited wire types
    BLOCK_TYPE = str
    STAGE = str
    DESTINATION = str
else:
    BLOCK_TYPE = limited(str, Limit(choices=BLOCK_TYPES))
    STAGE = limited(str, Limit(choices=tuple(STAGES)))
    DESTINATION = limited(str, Limit(max_len=1100))

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
class RawEvent(WireRecord):
    KIND = "raw_events"
    VERSION = 3  # 2: event_id and seq; 3: cgroup

    ip_version: IP_VERSION
    allowed: bool
    ip_proto: U8
    flags: U8
    src_ip: ADDRESS
    dst_ip: ADDRESS
    src_port: U16
    dst_port: U16
    timestamp_ns: I64  # wall clock, UTC ns (from the kernel's monotonic time)
    pid: U32
    comm: COMM
    packets: I64
    event_id: EVENT_ID  # "<journal id>-<seq>" if journaled, else ""
    seq: I64  # its number in capture's journal, 0 when not journaled
    cgroup: TEXT  # the owner's cgroup v2 path (/proc/<pid>/cgroup), "" if unknown

    @property
    def is_protocol_block(self) -> bool:
        """The seed's protocol-block shape (reference §1.6)."""
        return not self.allowed and self.src_port == 0 and self.dst_port < 256

    @property
    def mid_stream(self) -> bool:
        return bool(self.flags & FLAG_MID_STREAM)


@register
class EnrichedEvent(RawEvent):
    """A raw event's fields, then what enrich knows of the destination."""

    KIND = "enriched_events"

    protocol: SHORT       # name of ip_proto
    dst_hostname: NAME    # "" when unknown
    cname_chain: NAMES  # CNAME origin first, when it came through one

    @classmethod
    def from_raw(cls, raw: RawEvent, hostname: str = "",
                 cname_chain: list[str] | None = None) -> EnrichedEvent:
        return cls(*(*raw.to_wire(), protocol_name(raw.ip_proto), hostname, cname_chain or []))


@register
class DnsMapping(WireRecord):
    """dns -> enrich: a name resolved through the proxy (what enrich names addresses by)."""

    KIND = "dns_mappings"

    name: NAME                # queried name, lowercased, no trailing dot
    ips: ADDRESSES      # A/AAAA answers, address text
    ttl: U32                  # seconds
    cname_chain: NAMES  # origin first when it came through a chain
    timestamp_ns: I64


@register
class AllowRequest(WireRecord):
    """dns -> policy (REQ/REP): open the maps for a resolved name before its answer is sent."""

    KIND = "allow_requests"

    request_id: SHORT
    name: NAME  # the name whose rules apply: the query, or a chain's origin
    ips: ADDRESSES
    ttl: U32
    cname_chain: NAMES
    timestamp_ns: I64


@register
class AllowReply(WireRecord):
    """policy -> dns: the answer may be released once ok is true."""

    KIND = "allow_replies"

    request_id: SHORT
    ok: bool                                     # the maps hold what the rules say
    allowed_ips: ADDRESSES  # addresses the maps now allow for the name
    error: TEXT                  # why ok is false ("" when ok)


@register
class Notice(WireRecord):
    """policy -> notify: one blocked attempt (notify keeps one per destination)."""

    KIND = "notices"

    event_type: BLOCK_TYPE
    hostname: NAME
    ip: ADDRESS
    port: U16  # destination port; the protocol number for protocol blocks
    protocol: SHORT
    process: PROCESS
    pid: U32
    timestamp_ns: I64
    mode: MODE


@register
class DeliveredDestination(WireRecord):
    """notify -> persist: a destination alerted on (alone or in a delivered summary), so a
    restarted notify does not alert it again. persist, the store's one writer, keeps it."""

    KIND = "delivered_destinations"

    host: HOST
    destination: DESTINATION  # `<hostname or ip>:<port>`
    hostname: NAME
    ip: ADDRESS
    port: U16
    protocol: SHORT
    first_seen_ns: I64
    delivered_ns: I64


@register
class FeedEnd(WireRecord):
    """any stage -> the stages it feeds: its last message before it stops. Everything it
    sent came before, so the stage downstream may end once it has this from each upstream
    that is stopping (pipeline/stopping.py)."""

    KIND = "feed_ends"

    stage: STAGE  # the stage that stops
    pid: U32      # its process: a feed end vouches only for the run that sent it
