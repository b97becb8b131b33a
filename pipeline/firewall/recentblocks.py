"""Recent blocks, kept so a later DNS answer can re-label them late-allowed (reference §2.8).

A connection blocked before the proxy learned its address (the client used a cached answer)
is reported as connection_late_allowed, dated at the blocked attempt, once an answer opens
the firewall for it. Pure: time is passed in.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

from ..audit.records import AuditEvent
from ..policy.ports import ports_cover
from ..policy.verdict import PortSpec

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
    cgroup: str
    container: str


Key = tuple[str, int, str]  # (dst_ip, dst_port, protocol)


class RecentBlocks:
    """Blocks by (dst_ip, dst_port, protocol), oldest update first so pruning stops at the
    first live entry: constant work per record even during a flood of new destinations."""

    def __init__(self, ttl_ns: int = TTL_NS, capacity: int = CAPACITY) -> None:
        self.ttl_ns = ttl_ns if ttl_ns > 0 else TTL_NS
        self.capacity = capacity
        self.blocks: OrderedDict[Key, Block] = OrderedDict()
        self.keys_by_ip: dict[str, set[Key]] = {}
        self.dropped = 0  # new keys refused while full of live entries
        # While full, the oldest entry's expiry: a scan's every new key is refused until then
        # without a look at the entries. Any merge or removal may change the oldest: cleared.
        self.full_until = 0

    @property
    def size(self) -> int:
        return len(self.blocks)

    def remember(self, event: AuditEvent, now: int) -> None:
        """Remember a connection_blocked TCP/UDP record."""
        if event.event_type != "connection_blocked" or not event.dst_ip \
                or event.protocol not in ("TCP", "UDP"):
            return
        key = (event.dst_ip, event.dst_port, event.protocol)
        previous = self.blocks.get(key)
        if previous is not None and now - previous.at < self.ttl_ns:
            _merge(previous, event)
            self.blocks.move_to_end(key)
            self.full_until = 0
            return
        if previous is None and len(self.blocks) >= self.capacity:
            if now < self.full_until:
                self.dropped += 1
                return
            self._prune(now)
            if len(self.blocks) >= self.capacity:
                self.dropped += 1
                self.full_until = next(iter(self.blocks.values())).at + self.ttl_ns
                return
        self.blocks[key] = Block(event.src_ip, event.process, event.pid, list(event.cname_chain),
                                 event.timestamp, event.dst_ip, event.dst_port, event.protocol,
                                 event.cgroup, event.container)
        self.blocks.move_to_end(key)
        self.keys_by_ip.setdefault(event.dst_ip, set()).add(key)

    def take(self, ip: str, allow_ports: Sequence[PortSpec], deny_ports: Sequence[PortSpec],
             has_deny: bool, now: int) -> list[Block]:
        """Remove and return the live blocks of ip that the allow ports now cover (and the
        deny side does not), oldest first. Expired blocks of ip are dropped on the way."""
        taken = []
        for key in list(self.keys_by_ip.get(ip, ())):
            block = self.blocks[key]
            expired = now - block.at >= self.ttl_ns
            protocol = block.protocol.lower()
            if not expired and not ports_cover(allow_ports, block.dst_port, protocol):
                continue
            self._remove(key)
            denied = has_deny and ports_cover(deny_ports, block.dst_port, protocol)
            if not expired and not denied:
                taken.append(block)
        return sorted(taken, key=lambda b: b.at)

    def _prune(self, now: int) -> None:
        while self.blocks:
            key, block = next(iter(self.blocks.items()))
            if now - block.at < self.ttl_ns:
                return
            self._remove(key)

    def _remove(self, key: Key) -> None:
        self.full_until = 0
        del self.blocks[key]
        keys = self.keys_by_ip[key[0]]
        keys.discard(key)
        if not keys:
            del self.keys_by_ip[key[0]]


def _merge(block: Block, event: AuditEvent) -> None:
    """A repeated attempt: keep the later time, blank identity fields the attempts disagree on."""
    block.at = max(block.at, event.timestamp)
    if block.src_ip != event.src_ip:
        block.src_ip = ""
    if block.process != event.process:
        block.process = ""
    if block.pid != event.pid:
        block.pid = 0
    if block.cgroup != event.cgroup:
        block.cgroup = ""
    if block.container != event.container:
        block.container = ""


def late_allowed_record(block: Block, hostname: str, rule: str, chain: list[str]) -> AuditEvent:
    """The connection_late_allowed record for a reconciled block (flags stay false)."""
    return AuditEvent(timestamp=block.at, event_type="connection_late_allowed",
                      src_ip=block.src_ip, dst_ip=block.dst_ip, dst_hostname=hostname,
                      dst_port=block.dst_port, protocol=block.protocol, process=block.process,
                      pid=block.pid, matched_rule=rule, cname_chain=chain or block.cname_chain,
                      cgroup=block.cgroup, container=block.container)
