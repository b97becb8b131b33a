"""Which questions may be asked at all (reference §5.2), in the reference's order.

The strict PTR exemption lets reverse lookups of any address through, but only for names of
the exact canonical shape, so `1.2.3.4.in-addr.arpa.evil.example` or a PTR query for
`exfil-data.in-addr.arpa` cannot tunnel through it.

Every query is judged, cached answers included, so the part that depends on the policy alone
is remembered per name (PolicyMemory) until the policy object changes.
"""

from __future__ import annotations

import re

from ..policy.model import Policy
from ..policy.verdict import HostnameVerdict
from .cnames import LearnedTargets
from .packets import TYPE_PTR

_V4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_REVERSE_V4 = re.compile(rf"(?:{_V4_OCTET}\.){{4}}in-addr\.arpa")
_REVERSE_V6 = re.compile(r"(?:[0-9a-f]\.){32}ip6\.arpa")

MEMORY_CAPACITY = 10_000   # names, as many as the response cache holds answers

# Why a question was let through, or that it is refused.
PTR, RULE, LEARNED, SEARCH_DOMAIN, DEFAULT_ALLOW, REFUSE = (
    "ptr", "rule", "learned_cname", "search_domain", "default_allow", "refuse")


def is_canonical_reverse_name(name: str) -> bool:
    """Four decimal octets under in-addr.arpa, or 32 hex nibbles under ip6.arpa; name is
    lowercased without its trailing dot."""
    return bool(_REVERSE_V4.fullmatch(name) or _REVERSE_V6.fullmatch(name))


def judge_query(policy: Policy, learned: LearnedTargets, name: str, qtype: int,
                now: float) -> str:
    """The first reason that lets name through, or REFUSE. An explicit deny beats a learned
    CNAME target and the search-domain bypass."""
    if qtype == TYPE_PTR and is_canonical_reverse_name(name):
        return PTR
    reason = _by_rules(policy, name)
    if reason:
        return reason
    if learned.live(name, now) is not None:
        return LEARNED
    return _by_default(policy, name) or REFUSE


def passes_by_policy(policy: Policy, name: str) -> bool:
    """True when name passes on the policy alone (an allow rule, a user search domain, a
    default allow), which holds whatever the qtype and the learned targets: a learned target
    is looked at before the last two but only changes the reason given. False when it is
    refused, or when only a learned target or the PTR exemption could let it through:
    judge_query decides those."""
    reason = _by_rules(policy, name) or _by_default(policy, name)
    return reason is not None and reason != REFUSE


def _by_rules(policy: Policy, name: str) -> str | None:
    verdict = policy.match_hostname(name)
    if verdict.has_allow:
        return RULE   # mixed verdicts too: their deny side is enforced per port in the maps
    return REFUSE if verdict.has_deny else None


def _by_default(policy: Policy, name: str) -> str | None:
    if policy.under_user_search_domain(name):
        return SEARCH_DOMAIN
    return DEFAULT_ALLOW if policy.default_action == "allow" else None


class PolicyMemory:
    """Per name, the policy object's hostname verdict and passes_by_policy: every query and
    every answer needs them, cache hits included. A reload brings a new policy object, and
    with it an empty memory. At most `capacity` names; the oldest leaves first."""

    def __init__(self, capacity: int = MEMORY_CAPACITY) -> None:
        self.capacity = capacity
        self.policy: Policy | None = None
        self.names: dict[str, tuple[HostnameVerdict, bool]] = {}

    def of(self, policy: Policy, name: str) -> tuple[HostnameVerdict, bool]:
        if policy is not self.policy:
            self.policy, self.names = policy, {}
        known = self.names.get(name)
        if known is None:
            if len(self.names) >= self.capacity:
                del self.names[next(iter(self.names))]
            known = (policy.match_hostname(name), passes_by_policy(policy, name))
            self.names[name] = known
        return known
