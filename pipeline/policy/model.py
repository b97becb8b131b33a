"""A loaded policy: normalized rules plus the indexes every question is answered from.

A Policy never changes. Auto-allow helpers return a new Policy with the rules appended, so
readers (and the hot-reload diff) always see one consistent rule set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .cidrs import CidrMatcher, Conflict, parse_address
from .hostnames import HostnameMatcher
from .rules import Rule
from .verdict import HostnameVerdict, PortSpec


class Policy:
    def __init__(self, default_action: str = "deny", rules: Iterable[Rule] = (),
                 search_domains: Iterable[str] = (), source: str = "") -> None:
        self.default_action = default_action
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.search_domains: tuple[str, ...] = tuple(search_domains)
        self.source = source
        self.hostnames = HostnameMatcher(self.rules, self.search_domains)
        self.cidrs = CidrMatcher(self.rules)
        # Deny rules never tag a connection, so only auto-added allows are asked.
        self.auto_rules = tuple(r for r in self.rules if r.auto_added_type and r.action == "allow")

    def __repr__(self) -> str:
        return (f"Policy({self.source or 'inline'}: default {self.default_action}, "
                f"{len(self.rules)} rules, {len(self.search_domains)} search domains)")

    def with_rules(self, extra: Sequence[Rule] = (), search_domains: Sequence[str] = ()) -> Policy:
        if not extra and not search_domains:
            return self
        domains = dict.fromkeys((*self.search_domains, *search_domains))
        return Policy(self.default_action, (*self.rules, *extra), domains, self.source)

    @property
    def tracked_hostnames(self) -> dict[str, str]:
        """Literal hostname rules (pre-resolved, forward matched), name -> action."""
        return self.hostnames.tracked

    def match_hostname(self, name: str) -> HostnameVerdict:
        """MatchHostnameRule (reference §3.5)."""
        return self.hostnames.match(name)

    def find_tracked_hostname(self, name: str) -> str:
        """FindTrackedHostname (reference §3.5)."""
        return self.hostnames.find_tracked_hostname(name)

    def check_ip_rule_conflict(self, ip: str, action: str,
                               ports: Sequence[PortSpec]) -> Conflict:
        """CheckIPRuleConflict (reference §3.7): for the DNS path and late-allow alike."""
        return self.cidrs.check_conflict(parse_address(ip), action, ports)

    def ip_write_action(self, ip: str, action: str, ports: Sequence[PortSpec]) -> str | None:
        """The action a hostname side should write for ip, or None when there is nothing to
        write because the outcome equals the default action (reference §5.4 apply_side)."""
        final = self.check_ip_rule_conflict(ip, action, ports).action
        return None if final == self.default_action else final

    def under_user_search_domain(self, name: str) -> bool:
        """DNS filter bypass: user search domains only, never the Kubernetes suffixes."""
        return self.hostnames.under_user_search_domain(name.lower())
