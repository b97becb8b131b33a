"""Recent blocks, kept so a later DNS answer can re-label them late-allowed (reference §2.8).

A connection blocked before the proxy learned its address (the client used a cached answer)
is reported as connection_late_allowed, dated at the blocked attempt, once an answer opens
the firewall for it. Pure: time is passed in.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .audit import AuditEvent
from .policy.ports import ports_cover
from .policy.verdict import PortSpec

TTL_NS = 5 * 60 * 1_000_000_000
CAPACITY = 4096


@dataclasses.dataclass(slots=True)
class Block:
    src_ip: str
    process: str
    pid: int
    cname_chain: list[str]
    at: int       # timestamp of the latest attempt, ns
    dst_ip: str
    dst_port: int
    protocol: str  # TCP or UDP


Key = tuple[str, int, str]  # (dst_ip, dst_port, protocol)


class RecentBlocks:
    def __init__(self, ttl_ns: int = TTL_NS, capacity: int = CAPACITY) -> None:
        self.ttl_ns = ttl_ns if ttl_ns > 0 else TTL_NS
        self.capacity = capacity
        self.by_ip: dict[str, dict[Key, Block]] = {}
        self.size = 0
        self.dropped = 0  # new keys refused while full of live entries

    def record(self, event: AuditEvent, now: int) -> None:
        """Remember a connection_blocked TCP/UDP record."""
        if event.event_type != "connection_blocked" or not event.dst_ip \
                or event.protocol not in ("TCP", "UDP"):
            return
        key = (event.dst_ip, event.dst_port, event.protocol)
        entries = self.by_ip.get(event.dst_ip, {})
        previous = entries.get(key)
        if previous is not None and now - previous.at < self.ttl_ns:
            _merge(previous, event)
            return
        if previous is None and self.size >= self.capacity:
            self._prune(now)
            if self.size >= self.capacity:
                self.dropped += 1
                return
            entries = self.by_ip.get(event.dst_ip, {})
        if previous is None:
            self.size += 1
        self.by_ip.setdefault(event.dst_ip, entries)[key] = Block(
            event.src_ip, event.process, event.pid, list(event.cname_chain), event.timestamp,
            event.dst_ip, event.dst_port, event.protocol)

    def take(self, ip: str, allow_ports: Sequence[PortSpec], deny_ports: Sequence[PortSpec],
             has_deny: bool, now: int) -> list[Block]:
        """Remove and return the live blocks of ip that the allow ports now cover (and the
        deny side does not), oldest first."""
        entries = self.by_ip.get(ip)
        if not entries:
            return []
        taken = []
        for key, block in list(entries.items()):
            expired = now - block.at >= self.ttl_ns
            protocol = block.protocol.lower()
            if not expired and not ports_cover(allow_ports, block.dst_port, protocol):
                continue
            del entries[key]
            self.size -= 1
            denied = has_deny and ports_cover(deny_ports, block.dst_port, protocol)
            if not expired and not denied:
                taken.append(block)
        if not entries:
            del self.by_ip[ip]
        return sorted(taken, key=lambda b: b.at)

    def _prune(self, now: int) -> None:
        for ip in list(self.by_ip):
            entries = self.by_ip[ip]
            for key in [k for k, b in entries.items() if now - b.at >= self.ttl_ns]:
                del entries[key]
                self.size -= 1
            if not entries:
                del self.by_ip[ip]


def _merge(block: Block, event: AuditEvent) -> None:
    """A repeated attempt: keep the later time, blank identity fields the attempts disagree on."""
    block.at = max(block.at, event.timestamp)
    if block.src_ip != event.src_ip:
        block.src_ip = ""
    if block.process != event.process:
        block.process = ""
    if block.pid != event.pid:
        block.pid = 0


def late_allowed_record(block: Block, hostname: str, rule: str, chain: list[str]) -> AuditEvent:
    """The connection_late_allowed record for a reconciled block (flags stay false)."""
    return AuditEvent(timestamp=block.at, event_type="connection_late_allowed",
                      src_ip=block.src_ip, dst_ip=block.dst_ip, dst_hostname=hostname,
                      dst_port=block.dst_port, protocol=block.protocol, process=block.process,
                      pid=block.pid, matched_rule=rule, cname_chain=chain or block.cname_chain)
