"""The response cache (reference §5.3): LRU, lazy expiry, time passed in.

An entry keeps the answer's wire form (the id is rewritten per client; TTLs are not), the
facts enforcement needs, because a cached answer opens the firewall like a fresh one, and the
question's name text, so that a hit found by the question's bytes never makes it again. Keys
are packets.question_key bytes.
"""

from __future__ import annotations

import dataclasses

from .answers import AnswerFacts
from .lru import ExpiringLru

CAPACITY = 10_000
MAX_LIFETIME = 300   # seconds; also the lifetime of an answer whose TTLs are all zero


@dataclasses.dataclass(frozen=True, slots=True)
class CachedAnswer:
    qname: str    # the name as the storing query had it (packets.Query.qname)
    wire: bytes
    facts: AnswerFacts
    expires: float


def lifetime(smallest_positive_ttl: int) -> int:
    """min(300 s, the smallest positive TTL); 300 s when every TTL is zero."""
    return min(MAX_LIFETIME, smallest_positive_ttl) if smallest_positive_ttl > 0 else MAX_LIFETIME


class ResponseCache(ExpiringLru[CachedAnswer]):
    def __init__(self, capacity: int = CAPACITY) -> None:
        super().__init__(capacity)

    def store(self, key: bytes, qname: str, wire: bytes, facts: AnswerFacts, now: float) -> bool:
        """Keep a cacheable answer; returns whether it was kept."""
        if not key or not facts.cacheable:
            return False
        expires = now + lifetime(facts.smallest_positive_ttl)
        self.put(key, CachedAnswer(qname, wire, facts, expires))
        return True
