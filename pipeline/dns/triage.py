"""What the proxy does with one parsed query (pure: no sockets, no clock).

Three routes, decided in this order: a local reply (NOTIMP for another opcode, REFUSED for a
question the filter refuses in enforce mode, SERVFAIL when too many queries are in flight),
the cached answer, or a forward to the upstream. A refused question is recorded
(dns_blocked) in audit mode too, where it goes on as if allowed.
"""

from __future__ import annotations

import dataclasses

from .cache import CachedAnswer
from .packets import NOERROR, NOTIMP, OPCODE_QUERY, REFUSED, SERVFAIL, Query

LOCAL, CACHED, FORWARD = "local", "cached", "forward"


@dataclasses.dataclass(frozen=True, slots=True)
class Triage:
    route: str                         # LOCAL, CACHED or FORWARD
    rcode: int = NOERROR               # of a local reply
    counter: str = ""                  # what the decision counts (a local reply, a cache hit)
    blocked: bool = False              # the filter refused the question: record dns_blocked
    cached: CachedAnswer | None = None


def triage(query: Query, *, refused: bool, audit_mode: bool, overloaded: bool,
           cached: CachedAnswer | None) -> Triage:
    """refused: the filter is on and refuses the question; cached: the live cache entry for
    the question, if any."""
    if query.opcode != OPCODE_QUERY:
        return Triage(LOCAL, NOTIMP, "not_implemented")
    blocked = refused and bool(query.question)
    if blocked and not audit_mode:
        return Triage(LOCAL, REFUSED, "refused", blocked=True)
    if overloaded:
        return Triage(LOCAL, SERVFAIL, "overloaded", blocked=blocked)
    if cached is not None and query.question:
        return Triage(CACHED, counter="cache_hits", blocked=blocked, cached=cached)
    return Triage(FORWARD, blocked=blocked)
