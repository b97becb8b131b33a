"""What the proxy does with one parsed query (pure: no sockets, no clock).

Three routes, decided in this order: a local reply (NOTIMP for another opcode, REFUSED for a
question the filter refuses in enforce mode, SERVFAIL when too many queries are in flight),
the cached answer, or a forward to the upstream. A refused question is recorded
(dns_blocked) in audit mode too, where it goes on as if allowed.
"""

from __future__ import annotations

import dataclasses

from .packets import NOERROR, NOTIMP, OPCODE_QUERY, REFUSED, SERVFAIL, Query

LOCAL, CACHED, FORWARD = "local", "cached", "forward"


@dataclasses.dataclass(frozen=True, slots=True)
class Triage:
    route: str                         # LOCAL, CACHED or FORWARD
    rcode: int = NOERROR               # of a local reply
    counter: str = ""                  # what the decision counts (a local reply, a cache hit)
    blocked: bool = False              # the filter refused the question: record dns_blocked


# Every decision there is, made once: a cache hit is decided per query, tens of thousands
# a second, and building a frozen record each time is a measurable part of its cost.
_NOT_IMPLEMENTED = Triage(LOCAL, NOTIMP, "not_implemented")
_REFUSED = Triage(LOCAL, REFUSED, "refused", blocked=True)
_OVERLOADED = (Triage(LOCAL, SERVFAIL, "overloaded"),
               Triage(LOCAL, SERVFAIL, "overloaded", blocked=True))
_CACHE_HIT = (Triage(CACHED, counter="cache_hits"),
              Triage(CACHED, counter="cache_hits", blocked=True))
_FORWARD = (Triage(FORWARD), Triage(FORWARD, blocked=True))


def triage(query: Query, *, refused: bool, audit_mode: bool, overloaded: bool,
           cached: bool) -> Triage:
    """refused: the filter is on and refuses the question; cached: the cache holds a live
    answer to the question."""
    if query.opcode != OPCODE_QUERY:
        return _NOT_IMPLEMENTED
    blocked = refused and bool(query.question)
    if blocked and not audit_mode:
        return _REFUSED
    if overloaded:
        return _OVERLOADED[blocked]
    if cached and query.question:
        return _CACHE_HIT[blocked]
    return _FORWARD[blocked]
