"""What one NOERROR answer asks for, before it may be released (reference §5.4 steps 2-7).

The plan names the request to the policy stage (which re-matches the name and writes the
maps), the mapping for enrich, and a CNAME target worth resolving ahead of the client.
Learning CNAME targets is the one side effect, on the LearnedTargets passed in.
"""

from __future__ import annotations

import collections
import dataclasses

from ..policy.model import Policy
from ..policy.verdict import HostnameVerdict
from .answers import AnswerFacts
from .cnames import LearnedTargets, bounded, walk_chain

MAX_PRE_RESOLVE_DEPTH = 2
PRE_RESOLVE_INTERVAL = 30.0   # seconds between two pre-resolutions of one target
PRE_RESOLVE_MEMORY = 1_000


@dataclasses.dataclass(frozen=True, slots=True)
class AllowAsk:
    """Open the maps for these addresses under name's rules (name: the query, or the
    origin of the CNAME chain a derived answer came through)."""

    name: str
    chain: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class AnswerPlan:
    ask: AllowAsk | None          # None: nothing for the policy stage to write
    mapping_chain: tuple[str, ...] | None  # None: no mapping for enrich
    pre_resolve: str              # a CNAME target to resolve now, or ""


NOTHING = AnswerPlan(None, None, "")


def plan_answer(policy: Policy, learned: LearnedTargets, name: str, facts: AnswerFacts,
                now: float, depth: int = 0, verdict: HostnameVerdict | None = None) -> AnswerPlan:
    """verdict: policy.match_hostname(name), when the caller remembers it."""
    if verdict is None:
        verdict = policy.match_hostname(name)
    matched = verdict.matched
    derived = None if matched else learned.derive(name, now)
    # Most answers have no CNAME: nothing to walk or learn (every cache hit comes here).
    hops = walk_chain(name, facts.cnames) if facts.cnames else []
    if hops and verdict.has_allow:
        learned.learn(verdict.allow_ports, [name], 0, hops, now)
    elif hops and derived is not None:
        learned.learn(derived.ports, derived.chain, derived.reach, hops, now)
    targets = tuple(hop.target for hop in hops)
    if not facts.ips:
        allowed = verdict.has_allow or derived is not None
        pre_resolve = targets[-1] if hops and allowed and depth < MAX_PRE_RESOLVE_DEPTH else ""
        return AnswerPlan(None, None, pre_resolve)
    if derived is not None:
        chain = bounded(derived.chain + targets)
        return AnswerPlan(AllowAsk(chain[0], chain), chain, "")
    if not matched and policy.under_user_search_domain(name):
        return NOTHING   # the search-domain bypass lets the query through, nothing more
    chain = (name, *targets) if targets else ()
    ask = AllowAsk(name, chain) if matched else None
    return AnswerPlan(ask, chain, "")


class PreResolveMemory:
    """At most one pre-resolution per target per interval, remembering a bounded number."""

    def __init__(self, capacity: int = PRE_RESOLVE_MEMORY,
                 interval: float = PRE_RESOLVE_INTERVAL) -> None:
        self.capacity, self.interval = capacity, interval
        self.last: collections.OrderedDict[str, float] = collections.OrderedDict()

    def claim(self, target: str, now: float) -> bool:
        """True (and remembered) when target was not pre-resolved within the interval."""
        previous = self.last.get(target)
        if previous is not None and now - previous < self.interval:
            return False
        self.last[target] = now
        self.last.move_to_end(target)
        if len(self.last) > self.capacity:
            self.last.popitem(last=False)
        return True
