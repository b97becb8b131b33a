"""Names/s that the policy matcher judges, against a linear scan measured in the same run.

The policy has 1,000 hostname rules (exact names, parent domains, `*` and `**` globs of both
actions) and five search domains; the names mix exact hits, subdomains, glob hits,
search-domain and Kubernetes forms, and misses. The baseline is the straightforward matcher:
the same search-domain folding, but each name form scans every rule in order and matches
globs label by label. Both must return the same verdict for every name before anything is
timed. Each side runs several times and keeps its best: noise only ever adds time.

Usage: .venv/bin/python benchmarks/policy_match.py [--names 50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.policy.hostnames import FormMatch, HostnameMatcher
from pipeline.policy.model import Policy
from pipeline.policy.rules import Rule
from pipeline.policy.verdict import PortSpec

SEARCH_DOMAINS = (".corp.example.com", ".prod.internal", ".eu.corp.example.com",
                  ".ci.example.org", ".lab.example.net")
HTTPS = (PortSpec(443, "tcp"),)


def make_rules() -> list[Rule]:
    """600 exact names, 150 parent domains, 200 globs, 50 denied names: 1,000 rules."""
    rules = [Rule("hostname", f"svc{i}.team{i % 40}.example{i % 17}.com", "allow", HTTPS)
             for i in range(600)]
    rules += [Rule("hostname", f"corp{i}.net", "allow") for i in range(150)]
    for i in range(50):
        rules += [Rule("hostname", f"*.cdn{i}.example.net", "allow", HTTPS),
                  Rule("hostname", f"**.edge{i}.io", "allow"),
                  Rule("hostname", f"*.bad{i}.org", "deny"),
                  Rule("hostname", f"api.*.region{i}.cloud", "allow", HTTPS)]
    rules += [Rule("hostname", f"svc{i}.team{i % 40}.example{i % 17}.com", "deny")
              for i in range(0, 500, 10)]
    return rules


def make_names(count: int, rng: random.Random) -> list[str]:
    shapes = [
        lambda i: f"svc{i % 600}.team{i % 600 % 40}.example{i % 600 % 17}.com",
        lambda i: f"host{i}.corp{i % 150}.net",
        lambda i: f"img{i}.cdn{i % 50}.example.net",
        lambda i: f"a{i}.b.edge{i % 50}.io",
        lambda i: f"x{i}.bad{i % 50}.org",
        lambda i: f"api.r{i % 9}.region{i % 50}.cloud",
        lambda i: f"svc{i % 600}{rng.choice(SEARCH_DOMAINS)}",
        lambda i: f"redis{i % 30}.default.svc.cluster.local",
        lambda i: f"unknown{i}.example{i % 90}.org",
        lambda i: f"www.site{i}.com",
    ]
    return [rng.choice(shapes)(i) for i in range(count)]


class LinearMatcher(HostnameMatcher):
    """The baseline: every name form scans all rules in order."""

    def __init__(self, rules, search_domains) -> None:
        super().__init__(rules, search_domains)
        self.ordered = [r for r in rules if r.type == "hostname"]

    def match_form(self, name: str) -> FormMatch | None:
        exact = parent = deny_glob = allow_glob = None
        for rule in self.ordered:
            if rule.is_pattern:
                if glob_matches(rule.value.split("."), name.split(".")):
                    if rule.action == "deny" and deny_glob is None:
                        deny_glob = rule
                    if rule.action == "allow" and allow_glob is None:
                        allow_glob = rule
            elif rule.value == name:
                exact = rule
            elif name.endswith("." + rule.value):
                if parent is None or len(rule.value) > len(parent.value):
                    parent = rule
        for rule, kind in ((exact, "exact"), (deny_glob, "pattern"), (parent, "parent"),
                           (allow_glob, "pattern")):
            if rule is not None:
                return FormMatch(rule, kind)
        return None


def glob_matches(pattern: list[str], labels: list[str]) -> bool:
    if not pattern:
        return not labels
    if not labels:
        return False
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(glob_matches(rest, labels[taken:]) for taken in range(1, len(labels) + 1))
    return (head == "*" or head == labels[0]) and glob_matches(rest, labels[1:])


def best_rate(matcher: HostnameMatcher, names: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for name in names:
            matcher.match(name)
        best = min(best, time.perf_counter() - start)
    return len(names) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rules = make_rules()
    names = make_names(args.names, random.Random(7))
    indexed = Policy("deny", rules, SEARCH_DOMAINS).hostnames
    linear = LinearMatcher(rules, SEARCH_DOMAINS)
    mismatches = [n for n in names[:5000] if indexed.match(n) != linear.match(n)]
    if mismatches:
        sys.exit(f"verdicts differ, e.g. for {mismatches[0]!r}")
    matched = sum(indexed.match(n).matched for n in names) / len(names)
    baseline = best_rate(linear, names[: max(args.names // 20, 1)], args.repeat)
    sluice = best_rate(indexed, names, args.repeat)
    print(f"policy: {len(rules)} hostname rules, {len(SEARCH_DOMAINS)} search domains; "
          f"{args.names} names, {matched:.0%} matched")
    print(f"baseline (linear scan): {baseline:12,.0f} names/s")
    print(f"sluice (indexed):       {sluice:12,.0f} names/s")
    print(f"ratio: {sluice / baseline:.1f}x the baseline")


if __name__ == "__main__":
    main()
