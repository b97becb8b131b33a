"""CNAME chains (reference §5.4 steps 3-5): the walk, learned targets, derived allows.

When an allowed name answers with a CNAME, the target is learned with the allow rule's
ports, so that a client asking for the target directly (as stub resolvers do when an answer
stops at a CNAME) is let through and opened for the same ports, attributed to the chain's
origin. Learned targets live as long as the longest hop TTL seen (floored, capped at a day)
and only ever get longer lives. A chain holds at most MAX_CHAIN names (its origin and the
latest targets): an upstream answering with endless CNAMEs, or chains grown answer after
answer, never make a record larger than the pipeline's messages take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from ..policy.ports import union_ports
from ..policy.verdict import PortSpec
from .answers import CnameRecord
from .lru import ExpiringLru

CAPACITY = 10_000
MAX_REACH = 86_400       # a learned target never lives longer than a day
ZERO_TTL_REACH = 300     # a zero TTL still teaches the target for five minutes
MIN_REACH = 30
MAX_CHAIN = 32           # the cname_chain bound of every message kind (pipeline/wire.py NAMES)


@dataclasses.dataclass(frozen=True, slots=True)
class Hop:
    target: str
    ttl: int


@dataclasses.dataclass(slots=True)
class LearnedTarget:
    ports: tuple[PortSpec, ...]   # empty = all ports
    chain: tuple[str, ...]        # origin first, this target last
    expires: float


@dataclasses.dataclass(frozen=True, slots=True)
class Derived:
    """What a learned target passes on to an answer for it."""

    ports: tuple[PortSpec, ...]
    chain: tuple[str, ...]
    reach: float                  # its remaining life, seconds


def effective_ttl(ttl: int) -> int:
    return ZERO_TTL_REACH if ttl == 0 else max(ttl, MIN_REACH)


def walk_chain(name: str, cnames: Iterable[CnameRecord]) -> list[Hop]:
    """Follow CNAMEs from name: only records connected to it, each owner's first record,
    never a name twice (a loop ends the walk)."""
    first_by_owner: dict[str, CnameRecord] = {}
    for cname in cnames:
        first_by_owner.setdefault(cname.owner, cname)
    hops: list[Hop] = []
    seen, current = {name}, name
    while ((record := first_by_owner.get(current)) is not None and record.target not in seen
           and len(hops) < MAX_CHAIN - 1):
        hops.append(Hop(record.target, record.ttl))
        seen.add(record.target)
        current = record.target
    return hops


def bounded(chain: Sequence[str]) -> tuple[str, ...]:
    """The chain with at most MAX_CHAIN names: its origin (whose rules apply) and the last."""
    chain = tuple(chain)
    return chain if len(chain) <= MAX_CHAIN else chain[:1] + chain[1 - MAX_CHAIN:]


class LearnedTargets(ExpiringLru[LearnedTarget]):
    """CNAME targets reached from allowed names, time passed in."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        super().__init__(capacity)

    def derive(self, name: str, now: float) -> Derived | None:
        entry = self.live(name, now)
        if entry is None:
            return None
        return Derived(entry.ports, entry.chain, min(entry.expires - now, MAX_REACH))

    def learn(self, ports: Sequence[PortSpec], path: Sequence[str], reach: float,
              hops: Sequence[Hop], now: float) -> None:
        """Teach every hop target: path is the chain so far (the allowed name, or a derived
        name's inherited chain), reach the life carried in (0 for a rule's own name)."""
        path = list(path)
        for hop in hops:
            reach = min(max(reach, effective_ttl(hop.ttl)), MAX_REACH)
            path.append(hop.target)
            self._merge(hop.target, tuple(ports), bounded(path), now + reach, now)

    def _merge(self, target: str, ports: tuple[PortSpec, ...], chain: tuple[str, ...],
               expires: float, now: float) -> None:
        entry = self.live(target, now)
        if entry is None:
            self.put(target, LearnedTarget(ports, chain, expires))
            return
        entry.ports = union_ports(entry.ports, ports)
        entry.chain = chain or entry.chain
        entry.expires = max(entry.expires, expires)
