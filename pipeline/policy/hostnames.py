"""Hostname rules: validation, globs and the indexed matcher (reference §3.5).

Precedence in one name form: exact (last rule wins) > deny glob (first) > parent domain
(longest, first on ties) > allow glob (first). Exact and parent rules are found by dictionary
lookups of the name and its dot-suffixes; globs are bucketed by their literal tail, so a name
only tries the globs that could end like it, in rule order. Search-domain stripping matches a
second form and folds the two, possibly into a mixed verdict.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Sequence

from .ports import union_ports
from .rules import Rule
from .searchdomains import KUBERNETES_SUFFIXES
from .verdict import HostnameVerdict

_LITERAL_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def hostname_problem(value: str) -> str | None:
    """Why a lowercased hostname or glob cannot be a rule value, or None."""
    if not value:
        return "empty hostname"
    if _is_ip(value):
        return f'"{value}" is an IP address: use a cidr rule'
    labels = value.split(".")
    for position, label in enumerate(labels):
        if not label:
            return f'"{value}" has an empty label (leading, trailing or doubled ".")'
        if label == "**" and position and labels[position - 1] == "**":
            return f'"{value}": "**.**" is redundant, "**" already matches one or more labels'
        if "*" in label and label not in ("*", "**"):
            return f'"{value}": partial wildcard "{label}" ("*" and "**" must be whole labels)'
        if "*" not in label and not _LITERAL_LABEL.fullmatch(label):
            return (f'"{value}": label "{label}" must be 1-63 characters of a-z, 0-9, "-" '
                    'and "_"')
    return None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def glob_matches(pattern: str, name: str) -> bool:
    """`*` is exactly one label, `**` one or more; other labels compare literally. Walks the
    name's labels once, keeping every pattern position still possible: no backtracking, so
    no pattern and name can make it slow (a regular expression of several `**` could)."""
    parts = pattern.split(".")
    positions = {0}
    for label in name.split("."):
        if not label:
            return False
        following: set[int] = set()
        for i in positions:
            if i == len(parts):
                continue
            if parts[i] == "**":
                following.update((i, i + 1))  # this label is one of its labels, maybe the last
            elif parts[i] == "*" or parts[i] == label:
                following.add(i + 1)
        if not following:
            return False
        positions = following
    return len(parts) in positions


class Glob:
    """A hostname glob. The usual shapes, `*.tail` and `**.tail`, are matched with string
    operations; others label by label (glob_matches)."""

    __slots__ = ("pattern", "tail", "head")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.tail = literal_tail(pattern)
        head = pattern[:-len(self.tail) - 1] if self.tail else ""
        self.head = head if head in ("*", "**") else ""

    def matches(self, name: str) -> bool:
        if not self.head:
            return glob_matches(self.pattern, name)
        prefix = name[:-len(self.tail) - 1]
        if not prefix or not name.endswith("." + self.tail):
            return False
        if self.head == "*":
            return "." not in prefix
        return prefix[0] != "." and prefix[-1] != "." and ".." not in prefix


def literal_tail(pattern: str) -> str:
    """The literal labels a glob ends with; a matching name ends with '.' + this."""
    labels = pattern.split(".")
    tail: list[str] = []
    while labels and "*" not in labels[-1]:
        tail.insert(0, labels.pop())
    return ".".join(tail)


def dot_suffixes(name: str) -> list[str]:
    """Proper parent names of name, longest first: a.b.c -> [b.c, c]."""
    suffixes = []
    start = name.find(".")
    while start != -1:
        suffixes.append(name[start + 1:])
        start = name.find(".", start + 1)
    return suffixes


@dataclasses.dataclass(frozen=True, slots=True)
class FormMatch:
    """The rule that decides one name form, and how it matched."""

    rule: Rule
    kind: str  # exact | parent | pattern

    @property
    def exact(self) -> bool:
        return self.kind == "exact"

    def tracked_name(self, form: str) -> str:
        """The name that re-matches the same rule: the parent rule's value for a parent match."""
        return self.rule.value if self.kind == "parent" else form


class _Globs:
    """Globs of one action, bucketed by literal tail, each remembering its rule position."""

    def __init__(self) -> None:
        self.by_tail: dict[str, list[tuple[int, Glob, Rule]]] = {}

    def add(self, position: int, rule: Rule, glob: Glob) -> None:
        self.by_tail.setdefault(glob.tail, []).append((position, glob, rule))

    def first_match(self, name: str, suffixes: Sequence[str]) -> Rule | None:
        if not self.by_tail:
            return None
        buckets = [self.by_tail[s] for s in (*suffixes, "") if s in self.by_tail]
        candidates = buckets[0] if len(buckets) == 1 else sorted(
            (entry for bucket in buckets for entry in bucket), key=lambda entry: entry[0])
        for _, glob, rule in candidates:
            if glob.matches(name):
                return rule
        return None


class HostnameMatcher:
    """The resolved hostname rules of one policy plus its search domains."""

    def __init__(self, rules: Iterable[Rule], search_domains: Iterable[str] = ()) -> None:
        self.exact: dict[str, Rule] = {}
        self.parents: dict[str, Rule] = {}
        self.deny_globs, self.allow_globs = _Globs(), _Globs()
        self.patterns: dict[Rule, Glob] = {}
        for position, rule in enumerate(r for r in rules if r.type == "hostname"):
            if rule.is_pattern:
                globs = self.deny_globs if rule.action == "deny" else self.allow_globs
                self.patterns[rule] = Glob(rule.value)
                globs.add(position, rule, self.patterns[rule])
            else:
                self.exact[rule.value] = rule
                self.parents.setdefault(rule.value, rule)
        self.user_search_domains = tuple(search_domains)
        self.strip_suffixes = frozenset((*KUBERNETES_SUFFIXES, *self.user_search_domains))

    @property
    def tracked(self) -> dict[str, str]:
        """Literal hostname rules, name -> action (the last rule for a name wins)."""
        return {name: rule.action for name, rule in self.exact.items()}

    def match_form(self, name: str) -> FormMatch | None:
        """The deciding rule for one name form, without search-domain stripping."""
        rule = self.exact.get(name)
        if rule is not None:
            return FormMatch(rule, "exact")
        suffixes = dot_suffixes(name)
        rule = self.deny_globs.first_match(name, suffixes)
        if rule is not None:
            return FormMatch(rule, "pattern")
        for suffix in suffixes:
            rule = self.parents.get(suffix)
            if rule is not None:
                return FormMatch(rule, "parent")
        rule = self.allow_globs.first_match(name, suffixes)
        return FormMatch(rule, "pattern") if rule is not None else None

    def strip(self, name: str) -> str:
        """name without its longest search-domain suffix (Kubernetes or user), or ""."""
        start = name.find(".", 1)
        while start != -1:
            if name[start:] in self.strip_suffixes:
                return name[:start]
            start = name.find(".", start + 1)
        return ""

    def forms(self, name: str) -> tuple[FormMatch | None, str, FormMatch | None]:
        """(full-form match, stripped form, stripped-form match); stripped "" when none."""
        stripped = self.strip(name)
        return self.match_form(name), stripped, self.match_form(stripped) if stripped else None

    def match(self, name: str) -> HostnameVerdict:
        """MatchHostnameRule: the verdict of a name, folding the stripped form in."""
        full, stripped, short = self.forms(name.lower())
        if full is None:
            return HostnameVerdict() if short is None else _side(short)
        if short is None:
            return _side(full)
        if full.rule.action == short.rule.action == "deny":
            chosen = _pick_deny(full, short)
            return HostnameVerdict(deny_rule=chosen.rule.value,
                                   deny_ports=union_ports(full.rule.ports, short.rule.ports))
        if full.rule.action == short.rule.action:
            return _side(_pick_allow(full, short))
        allow, deny = (full, short) if full.rule.action == "allow" else (short, full)
        return HostnameVerdict(allow.rule.value, allow.rule.ports, deny.rule.value, deny.rule.ports)

    def find_tracked_hostname(self, name: str) -> str:
        """A name that re-matches to the same deciding side (deny first), or ""."""
        name = name.lower()
        full, stripped, short = self.forms(name)
        for action in ("deny", "allow"):
            full_hit = full if full is not None and full.rule.action == action else None
            short_hit = short if short is not None and short.rule.action == action else None
            if full_hit is not None and short_hit is not None:
                pick = _pick_deny if action == "deny" else _pick_allow
                chosen = pick(full_hit, short_hit)
                return chosen.tracked_name(name if chosen is full_hit else stripped)
            if full_hit is not None:
                return full_hit.tracked_name(name)
            if short_hit is not None:
                return short_hit.tracked_name(stripped)
        return ""

    def rule_matches(self, rule: Rule, name: str) -> bool:
        """Whether one hostname rule applies to name: exact, parent domain or glob."""
        if rule.is_pattern:
            return self.patterns[rule].matches(name)
        return name == rule.value or name.endswith("." + rule.value)

    def under_user_search_domain(self, name: str) -> bool:
        return any(name.endswith(suffix) for suffix in self.user_search_domains)


def _side(match: FormMatch) -> HostnameVerdict:
    rule = match.rule
    if rule.action == "deny":
        return HostnameVerdict(deny_rule=rule.value, deny_ports=rule.ports)
    return HostnameVerdict(allow_rule=rule.value, allow_ports=rule.ports)


def _pick_allow(full: FormMatch, short: FormMatch) -> FormMatch:
    return short if short.exact and not full.exact else full


def _pick_deny(full: FormMatch, short: FormMatch) -> FormMatch:
    """Attribution of a double deny: an exact form, else the all-ports one, else full."""
    if short.exact != full.exact:
        return short if short.exact else full
    if bool(full.rule.ports) != bool(short.rule.ports):
        return full if not full.rule.ports else short
    return full
