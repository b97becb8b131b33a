"""Hostname, glob, search-domain and CIDR matching, and port arithmetic (reference §3.5-3.8)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.policy.hostnames import Glob, glob_matches
from pipeline.policy.ports import (expand_ports, ports_cover, protocols_overlap, union_ports)
from tests.support.policykit import make_policy, specs

CORP = ".corp.example.com"


def summary(verdict):
    parts = []
    for side, rule, ports in (("allow", verdict.allow_rule, verdict.allow_ports),
                              ("deny", verdict.deny_rule, verdict.deny_ports)):
        if rule:
            listed = ",".join(f"{p.port}/{p.protocol}" for p in ports)
            parts.append(f"{side}:{rule}" + (f"[{listed}]" if listed else ""))
    return " ".join(parts)


PRECEDENCE = [
    (["allow api.x.com", "deny *.x.com"], "api.x.com", "allow:api.x.com"),
    (["allow x.com", "deny *.x.com"], "a.x.com", "deny:*.x.com"),
    (["deny x.com", "allow *.x.com"], "a.x.com", "deny:x.com"),
    (["allow *.x.com"], "a.x.com", "allow:*.x.com"),
    (["allow a.com", "deny a.com"], "a.com", "deny:a.com"),
    (["deny a.com", "allow a.com"], "a.com", "allow:a.com"),
    (["allow x.com", "deny b.x.com"], "a.b.x.com", "deny:b.x.com"),
    (["deny b.x.com", "allow x.com"], "a.b.x.com", "deny:b.x.com"),
    (["allow x.com", "deny x.com"], "a.x.com", "allow:x.com"),
    (["deny *.x.com 22/tcp", "deny **.com"], "a.x.com", "deny:*.x.com[22/tcp]"),
    (["allow **.com", "allow *.x.com"], "a.x.com", "allow:**.com"),
    (["allow *.x.com", "deny **.x.com"], "a.x.com", "deny:**.x.com"),
    (["allow a.com"], "b.a.com", "allow:a.com"),
    (["allow a.com"], "xa.com", ""),
    (["allow a.com"], "a.com.", ""),
    (["allow GitHub.com 443/tcp"], "API.GITHUB.COM", "allow:github.com[443/tcp]"),
    (["deny *.x.com", "allow a.x.com"], "a.x.com", "allow:a.x.com"),
    (["allow x.com", "deny *.a.x.com"], "b.x.com", "allow:x.com"),
    (["allow **.x.com", "deny x.com"], "a.x.com", "deny:x.com"),
    ([], "anything.example", ""),
]


@pytest.mark.parametrize("rules, name, expected", PRECEDENCE)
def test_hostname_precedence(rules, name, expected):
    assert summary(make_policy(*rules).match_hostname(name)) == expected


GLOBS = [
    ("*.x.com", "a.x.com", True),
    ("*.x.com", "a.b.x.com", False),
    ("*.x.com", "x.com", False),
    ("**.x.com", "a.b.x.com", True),
    ("**.x.com", "a.x.com", True),
    ("**.x.com", "x.com", False),
    ("api.*.x.com", "api.eu.x.com", True),
    ("api.*.x.com", "api.x.com", False),
    ("api.*.x.com", "api.a.b.x.com", False),
    ("api.**.x.com", "api.a.b.x.com", True),
    ("x.*", "x.com", True),
    ("x.*", "x.co.uk", False),
    ("x.**", "x.co.uk", True),
    ("*", "localhost", True),
    ("*", "a.b", False),
    ("**", "a.b.c", True),
    ("*.**.com", "a.b.com", True),
    ("*.**.com", "b.com", False),
    ("*.a-b.com", "x.a-b.com", True),
    ("*.a-b.com", "x.axb.com", False),
    ("*.x.com", "a.xycom", False),
    ("*._tcp.x.com", "_sip._tcp.x.com", True),
    ("*.x.com", "q.a.x.com", False),
]


@pytest.mark.parametrize("pattern, name, matches", GLOBS)
def test_globs(pattern, name, matches):
    verdict = make_policy(f"allow {pattern}").match_hostname(name)
    assert verdict.has_allow is matches


SEARCH_DOMAINS = [
    (["allow db"], "db.corp.example.com", "allow:db"),
    (["allow redis"], "redis.default.svc.cluster.local", "allow:redis"),
    (["allow redis.prod"], "redis.prod.svc.cluster.local", "allow:redis.prod"),
    (["allow redis.default"], "redis.default.svc.cluster.local", ""),
    (["allow db", "allow corp.example.com"], "db.corp.example.com", "allow:db"),
    (["allow db", "allow db.corp.example.com"], "db.corp.example.com",
     "allow:db.corp.example.com"),
    (["allow *", "allow *.corp.example.com"], "db.corp.example.com",
     "allow:*.corp.example.com"),
    (["deny db 22/tcp", "deny db.corp.example.com 80/tcp"], "db.corp.example.com",
     "deny:db.corp.example.com[80/tcp,22/tcp]"),
    (["deny db 22/tcp", "deny example.com"], "db.corp.example.com", "deny:db"),
    (["deny * 22/tcp", "deny example.com"], "db.corp.example.com", "deny:example.com"),
    (["deny *", "deny example.com 22/tcp"], "db.corp.example.com", "deny:*"),
    (["deny * 22/tcp", "deny example.com 80/tcp"], "db.corp.example.com",
     "deny:example.com[80/tcp,22/tcp]"),
    (["allow db.corp.example.com", "deny db 5432/tcp"], "db.corp.example.com",
     "allow:db.corp.example.com deny:db[5432/tcp]"),
    (["deny db.corp.example.com 22/tcp", "allow db"], "db.corp.example.com",
     "allow:db deny:db.corp.example.com[22/tcp]"),
    (["deny db"], "db.corp.example.com", "deny:db"),
    (["allow db.corp.example.com"], "db.corp.example.com", "allow:db.corp.example.com"),
    (["allow corp.example.com"], "corp.example.com", "allow:corp.example.com"),
    (["allow db"], "db.corp.example.com.evil.org", ""),
    (["allow db"], "DB.Corp.Example.com", "allow:db"),
]


@pytest.mark.parametrize("rules, name, expected", SEARCH_DOMAINS)
def test_search_domain_composition(rules, name, expected):
    policy = make_policy(*rules, domains=[CORP])
    assert summary(policy.match_hostname(name)) == expected


TRACKED = [
    (["allow github.com"], "api.github.com", "github.com"),
    (["allow github.com"], "github.com", "github.com"),
    (["allow *.x.com"], "a.x.com", "a.x.com"),
    (["allow github.com"], "example.org", ""),
    (["allow db.corp.example.com", "deny db"], "db.corp.example.com", "db"),
    (["deny db.corp.example.com", "allow db"], "db.corp.example.com", "db.corp.example.com"),
    (["allow db", "allow example.com"], "db.corp.example.com", "db"),
    (["allow db", "allow db.corp.example.com"], "db.corp.example.com", "db.corp.example.com"),
    (["allow corp"], "api.corp.corp.example.com", "corp"),
    (["deny db 22/tcp", "deny example.com"], "db.corp.example.com", "db"),
    (["deny * 22/tcp", "deny example.com"], "db.corp.example.com", "example.com"),
    (["allow *"], "db.corp.example.com", "db"),
]


@pytest.mark.parametrize("rules, name, expected", TRACKED)
def test_find_tracked_hostname(rules, name, expected):
    policy = make_policy(*rules, domains=[CORP])
    assert policy.find_tracked_hostname(name) == expected
    if expected:
        # The tracked name re-matches to a verdict with the same deciding side.
        assert policy.match_hostname(expected).matched


def test_tracked_hostnames_are_literal_rules_last_action_wins():
    policy = make_policy("allow a.com", "deny *.b.com", "deny a.com", "allow c.com")
    assert policy.tracked_hostnames == {"a.com": "deny", "c.com": "allow"}


CONFLICTS = [
    ([], "1.2.3.4", "allow", "", ("allow", False, "")),
    (["deny 10.0.0.0/8"], "10.1.2.3", "allow", "", ("deny", True, "10.0.0.0/8")),
    (["allow 10.0.0.0/8"], "10.1.2.3", "allow", "", ("allow", False, "")),
    (["allow 10.0.0.0/8"], "10.1.2.3", "deny", "", ("deny", True, "10.0.0.0/8")),
    (["deny 10.0.0.0/8 22/tcp"], "10.1.2.3", "allow", "443/tcp", ("allow", False, "")),
    (["deny 10.0.0.0/8 443/udp"], "10.1.2.3", "allow", "443/tcp", ("allow", False, "")),
    (["deny 10.0.0.0/8 443/all"], "10.1.2.3", "allow", "443/tcp",
     ("deny", True, "10.0.0.0/8")),
    (["deny 10.0.0.0/8 443/tcp"], "10.1.2.3", "allow", "", ("deny", True, "10.0.0.0/8")),
    (["deny 10.0.0.0/8"], "10.1.2.3", "allow", "443/tcp", ("deny", True, "10.0.0.0/8")),
    (["deny 10.0.0.0/8", "allow 10.1.0.0/16"], "10.1.2.3", "allow", "", ("allow", False, "")),
    (["allow 10.0.0.0/8", "deny 10.1.2.0/24"], "10.1.2.3", "allow", "",
     ("deny", True, "10.1.2.0/24")),
    (["deny 10.0.0.0/8", "allow 10.0.0.0/8"], "10.1.2.3", "allow", "",
     ("deny", True, "10.0.0.0/8")),
    (["deny 2001:db8::/32"], "2001:db8::1", "allow", "", ("deny", True, "2001:db8::/32")),
    (["deny ::/0"], "1.2.3.4", "allow", "", ("allow", False, "")),
    (["deny 10.0.0.0/8"], "::ffff:10.1.2.3", "allow", "", ("deny", True, "10.0.0.0/8")),
    (["deny 10.1.2.3"], "10.1.2.3", "allow", "", ("deny", True, "10.1.2.3/32")),
]


@pytest.mark.parametrize("rules, ip, action, ports, expected", CONFLICTS)
def test_check_ip_rule_conflict(rules, ip, action, ports, expected):
    conflict = make_policy(*rules).check_ip_rule_conflict(ip, action, specs(ports))
    assert (conflict.action, conflict.conflict, conflict.rule) == expected


WRITE_ACTIONS = [
    ("deny", [], "allow", "allow"),
    ("deny", [], "deny", None),
    ("allow", [], "allow", None),
    ("allow", [], "deny", "deny"),
    ("deny", ["deny 10.0.0.0/8"], "allow", None),
    ("allow", ["deny 10.0.0.0/8"], "allow", "deny"),
]


@pytest.mark.parametrize("default, rules, action, expected", WRITE_ACTIONS)
def test_ip_write_action_skips_what_the_default_already_does(default, rules, action, expected):
    policy = make_policy(*rules, default=default)
    assert policy.ip_write_action("10.1.2.3", action, ()) == expected


@pytest.mark.parametrize("a, b, overlap", [
    ("all", "tcp", True), ("tcp", "all", True), ("tcp", "tcp", True), ("tcp", "udp", False),
    ("icmp", "tcp", False), ("", "", True), ("all", "all", True),
])
def test_protocols_overlap(a, b, overlap):
    assert protocols_overlap(a, b) is overlap


@pytest.mark.parametrize("a, b, expected", [
    ("", "443/tcp", ""),
    ("443/tcp", "", ""),
    ("443/tcp", "80/tcp", "443/tcp 80/tcp"),
    ("443/tcp 80/tcp", "80/tcp 53/udp", "443/tcp 80/tcp 53/udp"),
    ("443/tcp", "443/udp", "443/tcp 443/udp"),
])
def test_union_ports(a, b, expected):
    assert union_ports(specs(a), specs(b)) == specs(expected)


@pytest.mark.parametrize("ports, port, protocol, covered", [
    ("", 443, "tcp", True),
    ("", 0, None, True),
    ("443/tcp", 443, None, False),
    ("443/tcp", 443, "tcp", True),
    ("443/tcp", 443, "udp", False),
    ("443/all", 443, "udp", True),
    ("443/tcp", 80, "tcp", False),
    ("443/tcp", 443, "all", True),
    ("0/icmp", 0, "icmp", True),
])
def test_ports_cover(ports, port, protocol, covered):
    assert ports_cover(specs(ports), port, protocol) is covered


@pytest.mark.parametrize("ports, keys", [
    ("443/tcp", [(443, 6)]),
    ("53/udp", [(53, 17)]),
    ("0/icmp", [(0, 1)]),
    ("443/all", [(0, 1), (443, 6), (443, 17)]),
    ("443/all 80/all", [(0, 1), (443, 6), (443, 17), (80, 6), (80, 17)]),
])
def test_port_expansion(ports, keys):
    assert expand_ports(specs(ports)) == keys


@pytest.mark.parametrize("pattern", ["*.x.com", "**.x.com", "api.*.x.com", "*", "**", "x.**"])
@pytest.mark.parametrize("name", ["a.x.com", "a.b.x.com", "x.com", ".x.com", "a..x.com",
                                  "a.x.com.", "api.eu.x.com", "ax.com", "x.y", "a"])
def test_glob_shortcuts_agree_with_the_regular_expression(pattern, name):
    assert Glob(pattern).matches(name) is bool(glob_regex(pattern).fullmatch(name))


def glob_regex(pattern: str) -> re.Pattern:
    """The globs' meaning as a regular expression: the specification glob_matches meets
    (never used to match: several `**` make it backtrack exponentially)."""
    parts = {"*": r"[^.]+", "**": r"[^.]+(?:\.[^.]+)*"}
    return re.compile(r"\.".join(parts.get(label) or re.escape(label)
                                  for label in pattern.split(".")))


glob_labels = st.sampled_from(["*", "**", "a", "b", "x-1"])


@settings(max_examples=500)
@given(st.lists(glob_labels, min_size=1, max_size=6).map(".".join),
       st.lists(st.sampled_from(["a", "b", "x-1", "c", ""]), min_size=1, max_size=7)
       .map(".".join))
def test_glob_matching_is_the_regular_expression(pattern, name):
    assert glob_matches(pattern, name) is bool(glob_regex(pattern).fullmatch(name))
    assert Glob(pattern).matches(name) is glob_matches(pattern, name)


def test_a_glob_of_many_double_stars_against_a_long_name_ends_at_once():
    """A policy's glob and a queried name (anyone's) once made a regular expression that
    backtracked for minutes: the policy and dns stages would have stood still."""
    pattern = ".".join(["**", "a"] * 30) + ".c"
    name = ".".join(["a"] * 120) + ".b"
    assert not glob_matches(pattern, name) and not Glob(pattern).matches(name)
    assert glob_matches(pattern, ".".join(["a"] * 120) + ".c")
