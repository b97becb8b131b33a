"""`sluice policy explain` and `sluice policy check`: which rule decides, and the rule table."""

import pytest

from pipeline.policy.explain import explain, render_table
from tests.support.policykit import make_policy

POLICY = make_policy(
    "allow 10.0.0.0/8 443/tcp", "deny 10.9.0.0/16", "allow 0.0.0.0/0 53/udp",
    "allow github.com 443/tcp", "deny *.evil.com", "deny db 5432/tcp",
    "allow db.corp.example.com", "deny blocked.example.com 22/tcp",
    "allow api.example.com 443/tcp", "deny api.corp.example.com", "allow api 8443/tcp",
    domains=[".corp.example.com"])

KEYS = ["target", "allow_rule", "allow_ports", "deny_rule", "deny_ports", "decision", "reason"]

EXPLAINED = [
    # (target, port, protocol) -> (target, allow rule, allow ports, deny rule, deny ports, decision)
    (("github.com",), ("github.com", "github.com", [(443, "tcp")], "", [], "allow")),
    (("GitHub.com.",), ("github.com", "github.com", [(443, "tcp")], "", [], "allow")),
    (("api.github.com", 443, "tcp"),
     ("api.github.com", "github.com", [(443, "tcp")], "", [], "allow")),
    (("api.github.com", 443), ("api.github.com", "github.com", [(443, "tcp")], "", [], "allow")),
    (("api.github.com", 80), ("api.github.com", "github.com", [(443, "tcp")], "", [], "deny")),
    (("api.github.com", 443, "udp"),
     ("api.github.com", "github.com", [(443, "tcp")], "", [], "deny")),
    (("x.evil.com",), ("x.evil.com", "", [], "*.evil.com", [], "deny")),
    (("nothing.org",), ("nothing.org", "", [], "", [], "deny")),
    (("db.corp.example.com", 5432), ("db.corp.example.com", "db.corp.example.com", [], "db",
                                     [(5432, "tcp")], "allow")),
    (("blocked.example.com",), ("blocked.example.com", "", [], "blocked.example.com",
                                [(22, "tcp")], "deny")),
    (("blocked.example.com", 443), ("blocked.example.com", "", [], "blocked.example.com",
                                    [(22, "tcp")], "deny")),
    (("api.corp.example.com",), ("api.corp.example.com", "api", [(8443, "tcp")],
                                 "api.corp.example.com", [], "deny")),
    (("api.corp.example.com", 8443), ("api.corp.example.com", "api", [(8443, "tcp")],
                                      "api.corp.example.com", [], "deny")),
    (("10.1.2.3", 443), ("10.1.2.3", "10.0.0.0/8", [(443, "tcp")], "", [], "allow")),
    (("10.1.2.3", 80), ("10.1.2.3", "10.0.0.0/8", [(443, "tcp")], "", [], "deny")),
    (("10.1.2.3", 53, "udp"), ("10.1.2.3", "10.0.0.0/8", [(443, "tcp")], "", [], "allow")),
    (("10.1.2.3",), ("10.1.2.3", "10.0.0.0/8", [(443, "tcp")], "", [], "allow")),
    (("10.9.1.1", 443), ("10.9.1.1", "", [], "10.9.0.0/16", [], "deny")),
    (("11.1.1.1",), ("11.1.1.1", "0.0.0.0/0", [(53, "udp")], "", [], "allow")),
    (("11.1.1.1", 0, "icmp"), ("11.1.1.1", "0.0.0.0/0", [(53, "udp")], "", [], "deny")),
    (("[::ffff:10.1.2.3]", 443), ("10.1.2.3", "10.0.0.0/8", [(443, "tcp")], "", [], "allow")),
    (("2001:db8::1",), ("2001:db8::1", "", [], "", [], "deny")),
]


@pytest.mark.parametrize("query, expected", EXPLAINED)
def test_explain(query, expected):
    result = explain(POLICY, *query)
    assert list(result) == KEYS
    target, allow_rule, allow_ports, deny_rule, deny_ports, decision = expected
    assert result["target"] == target
    assert (result["allow_rule"], result["deny_rule"], result["decision"]) == (
        allow_rule, deny_rule, decision)
    assert result["allow_ports"] == [{"port": p, "protocol": pr} for p, pr in allow_ports]
    assert result["deny_ports"] == [{"port": p, "protocol": pr} for p, pr in deny_ports]
    assert result["reason"].endswith(".")


@pytest.mark.parametrize("query, phrase", [
    (("github.com",), 'the exact rule "github.com"'),
    (("api.github.com",), 'the parent-domain rule "github.com"'),
    (("x.evil.com",), 'the glob rule "*.evil.com"'),
    (("db.corp.example.com",), "after its search domain is stripped"),
    (("db.corp.example.com",), "a mixed verdict"),
    (("github.com",), "at DNS time"),
    (("blocked.example.com", 443), "DNS queries for the name are refused"),
    (("foo.corp.example.com",), "under a search domain"),
    (("nothing.org",), "the default action (deny) applies"),
    (("10.9.1.1",), "the most specific CIDR rule containing it"),
    (("10.1.2.3", 80), "No CIDR rule names 80/tcp"),
])
def test_reasons_say_why(query, phrase):
    assert phrase in explain(POLICY, *query)["reason"]


def test_explain_rejects_unknown_protocols():
    with pytest.raises(ValueError):
        explain(POLICY, "github.com", 443, "sctp")


def test_rule_table():
    table = render_table(make_policy("allow github.com 443/tcp 53/udp", "deny *.evil.com",
                                     domains=[".corp.example.com"]))
    assert table.splitlines() == [
        "source: test",
        "default action: deny",
        "search domains: .corp.example.com",
        "",
        "#  type             value       action  ports            auto",
        "0  hostname         github.com  allow   443/tcp, 53/udp",
        "1  hostname (glob)  *.evil.com  deny    all ports",
    ]


def test_empty_rule_table():
    assert render_table(make_policy()).splitlines()[-1] == "(no rules)"
