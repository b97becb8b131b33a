"""The response cache (reference §5.3): LRU, lazy expiry, time passed in.

An entry keeps the answer's wire form (the id is rewritten per client; TTLs are not) and the
facts enforcement needs, because a cached answer opens the firewall like a fresh one.
"""

from __future__ import annotations

import collections
import dataclasses
from .answers import AnswerFacts

CAPACITY = 10_000
MAX_LIFETIME = 300   # seconds; also the lifetime of an answer whose TTLs are all zero


@dataclasses.dataclass(frozen=True, slots=True)
class CachedAnswer:
    wire: bytes
    facts: AnswerFacts
    expires: float


def lifetime(smallest_positive_ttl: int) -> int:
    """min(300 s, the smallest positive TTL); 300 s when every TTL is zero."""
    return min(MAX_LIFETIME, smallest_positive_ttl) if smallest_positive_ttl > 0 else MAX_LIFETIME


class ResponseCache:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.entries: collections.OrderedDict[str, CachedAnswer] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str, now: float) -> CachedAnswer | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: str, wire: bytes, facts: AnswerFacts, now: float) -> bool:
        """Keep a cacheable answer; returns whether it was kept."""
        if not key or not facts.cacheable:
            return False
        self.entries[key] = CachedAnswer(wire, facts, now + lifetime(facts.smallest_positive_ttl))
        self.entries.move_to_end(key)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return True
