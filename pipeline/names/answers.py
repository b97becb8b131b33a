"""The names of the addresses the policy stage opened for DNS answers. Pure: time passed in.

A connection that a proxy answer opened must be recorded with that answer's name. The dns
stage sends the mapping to enrich before it asks policy to open the addresses, but enrich
takes messages from dns and from capture in whatever order they reach it: now and then the
connection's event comes first, finds nothing to name it by, and its reverse lookup ends
before the mapping is read. The policy stage opened the address for the name a moment
before it sees the event, so it names what enrich could not.
"""

from __future__ import annotations

from collections import OrderedDict

CAPACITY = 65_536
MIN_TTL_S = 60     # an answer with TTL 0 is still the one its connection followed
MAX_TTL_S = 86_400
NS_PER_S = 1_000_000_000


class AnswerNames:
    """address -> (name, CNAME chain) of the latest answer that opened it, while that answer
    lives; bounded, the least recently opened address forgotten first."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.names: OrderedDict[str, tuple[str, list[str], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.names)

    def opened(self, name: str, chain: list[str], ips: list[str], ttl: int, now_ns: int) -> None:
        expires = now_ns + min(max(ttl, MIN_TTL_S), MAX_TTL_S) * NS_PER_S
        for ip in ips:
            self.names[ip] = (name, list(chain), expires)
            self.names.move_to_end(ip)
        while len(self.names) > self.capacity:
            self.names.popitem(last=False)

    def name_of(self, ip: str, now_ns: int) -> tuple[str, list[str]] | None:
        """(name, chain) of the live answer that opened ip; None when there is none."""
        found = self.names.get(ip)
        if found is None:
            return None
        name, chain, expires = found
        if now_ns >= expires:
            del self.names[ip]
            return None
        return name, list(chain)
