"""Who gets one of the DNS proxy's TCP slots (pure: no sockets, no clock of its own).

A few hundred idle connections must not deny TCP DNS to everyone else. So a client address
holds at most `per_address` connections, and a newcomer beyond that share, or beyond the
`total`, takes the slot of the connection that has been idle longest: of its own address
first, else of the address holding the most connections. A connection with a query in
flight or an answer still going out is never taken; when every candidate is busy the
newcomer is refused.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable, Iterable


@dataclasses.dataclass(frozen=True, slots=True)
class Held:
    key: Hashable             # the connection
    address: str              # its client address
    idle_since: float | None  # None while it has a query in flight or an answer to send


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    admit: bool
    evict: Hashable | None = None  # close this one first


def make_room(address: str, held: Iterable[Held], total: int, per_address: int) -> Admission:
    """Whether a new connection from address gets a slot, and whose slot it takes."""
    held = list(held)
    per = collections.Counter(h.address for h in held)
    if per[address] >= per_address:
        pool = [h for h in held if h.address == address]
    elif len(held) >= total:
        pool = held
    else:
        return Admission(True)
    idle = [h for h in pool if h.idle_since is not None]
    if not idle:
        return Admission(False)
    victim = min(idle, key=lambda h: (-per[h.address], h.idle_since))
    return Admission(True, victim.key)
