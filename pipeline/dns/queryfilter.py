"""Which questions may be asked at all (reference §5.2), in the reference's order.

The strict PTR exemption lets reverse lookups of any address through, but only for names of
the exact canonical shape, so `1.2.3.4.in-addr.arpa.evil.example` or a PTR query for
`exfil-data.in-addr.arpa` cannot tunnel through it.
"""

from __future__ import annotations

import re

from ..policy.model import Policy
from .cnames import LearnedTargets
from .packets import TYPE_PTR

_V4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_REVERSE_V4 = re.compile(rf"(?:{_V4_OCTET}\.){{4}}in-addr\.arpa")
_REVERSE_V6 = re.compile(r"(?:[0-9a-f]\.){32}ip6\.arpa")

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
    verdict = policy.match_hostname(name)
    if verdict.has_allow:
        return RULE   # mixed verdicts too: their deny side is enforced per port in the maps
    if verdict.has_deny:
        return REFUSE
    if learned.live(name, now) is not None:
        return LEARNED
    if policy.under_user_search_domain(name):
        return SEARCH_DOMAIN
    if policy.default_action == "allow":
        return DEFAULT_ALLOW
    return REFUSE
