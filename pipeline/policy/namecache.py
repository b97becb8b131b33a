"""IP <-> hostname knowledge learned from DNS answers (reference §3.10), with time passed in.

The DNS stage records what answers said; enrich asks which name an event's address belongs
to. Addresses are the canonical text of pipeline.addresses.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence

CACHE_CAPACITY = 10_000      # above this, entries older than MAX_AGE are dropped
MAX_AGE = 24 * 3600.0
CNAME_ORIGINS_PER_IP = 8
CNAME_MIN_LIFE = 300.0


@dataclasses.dataclass(slots=True)
class _CnameRecord:
    chain: tuple[str, ...]
    last_seen: float
    expiry: float


class HostnameCache:
    def __init__(self, capacity: int = CACHE_CAPACITY, max_age: float = MAX_AGE) -> None:
        self.capacity = capacity
        self.max_age = max_age
        # ip -> (name, last seen), oldest update first so ageing pops from the front
        self.names: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self.tracked_ips: dict[str, list[str]] = {}   # tracked hostname -> answer IPs seen
        self._tracked_by_ip: dict[str, str] = {}
        self.cnames: dict[str, list[_CnameRecord]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def set_tracked(self, hostnames: Iterable[str]) -> None:
        """The literal hostname rules of the policy in force; IP lists of names that stay
        tracked survive, as they do across cargowall's reloads."""
        self.tracked_ips = {name: self.tracked_ips.get(name, []) for name in hostnames}
        self._tracked_by_ip = {ip: name for name, ips in self.tracked_ips.items() for ip in ips}

    def update_dns_mapping(self, name: str, ip: str, now: float) -> None:
        """An answer said name has address ip."""
        if not ip:
            return
        name = name.lower()
        self.names[ip] = (name, now)
        self.names.move_to_end(ip)
        ips = self.tracked_ips.get(name)
        if ips is not None and ip not in ips:
            ips.append(ip)
            self._tracked_by_ip.setdefault(ip, name)
        if len(self.names) > self.capacity:
            self._age(now)

    def _age(self, now: float) -> None:
        """Drop entries unseen for max_age; the cache may stay above capacity."""
        cutoff = now - self.max_age
        while self.names:
            ip, (_, seen) = next(iter(self.names.items()))
            if seen >= cutoff:
                break
            del self.names[ip]
            self.cnames.pop(ip, None)

    def lookup_hostname_by_ip(self, ip: str) -> str:
        entry = self.names.get(ip)
        return entry[0] if entry else self.forward_match_ip(ip)

    def forward_match_ip(self, ip: str) -> str:
        """A tracked hostname whose answers included ip, or ""."""
        return self._tracked_by_ip.get(ip, "")

    def ips_for(self, hostname: str) -> tuple[str, ...]:
        return tuple(self.tracked_ips.get(hostname, ()))

    def record_cname_chain(self, ip: str, chain: Sequence[str], ttl: float, now: float) -> None:
        """ip was reached through chain (origin first); kept for max(ttl, 5 min)."""
        if not chain:
            return
        chain = tuple(name.lower() for name in chain)
        expiry = now + max(ttl, CNAME_MIN_LIFE)
        records = self.cnames.setdefault(ip, [])
        for record in records:
            if record.chain[0] == chain[0]:
                record.chain, record.last_seen, record.expiry = chain, now, expiry
                return
        records.append(_CnameRecord(chain, now, expiry))
        if len(records) > CNAME_ORIGINS_PER_IP:
            records.remove(min(records, key=lambda r: r.last_seen))

    def cname_chain(self, ip: str, now: float) -> tuple[str, ...]:
        """The most recently seen live chain for ip, else the most recently seen one."""
        records = self.cnames.get(ip)
        if not records:
            return ()  # most addresses: asked for every event enrich names
        live = [r for r in records if r.expiry > now]
        best = None
        for record in live or records:
            if best is None or record.last_seen >= best.last_seen:
                best = record
        return best.chain if best else ()
