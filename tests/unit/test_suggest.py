"""`sluice suggest`: a draft that policy check accepts and that allows every observed connection."""

import json

import pytest

from pipeline.audit.records import AuditEvent
from pipeline.firewall.writer import Firewall
from pipeline.policy.load import policy_from_text
from pipeline.policy.verdict import PortSpec
from pipeline.rulemaps import ALLOW, DictRuleMaps
from pipeline.audit.store import AuditStore
from pipeline.audit.suggest import (Seen, SuggestError, draft_policy, name_allowed, parse_since,
                              seen_in)

T = 1_767_225_600_000_000_000
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1}


def audit(n, name, ip, port, protocol="TCP", event_type="connection_blocked", **fields):
    values = dict(would_deny=event_type.endswith("_blocked"), event_id=f"s-{n}", host="h")
    values.update(fields)
    return AuditEvent(T + n, event_type, src_ip="10.0.0.2", dst_ip=ip, dst_hostname=name,
                      dst_port=port, protocol=protocol, process="p", **values)


ROWS = [
    audit(1, "a.cdn.example.com", "1.0.0.1", 443),
    audit(2, "b.cdn.example.com", "1.0.0.2", 443),
    audit(3, "c.cdn.example.com", "1.0.0.3", 8443),
    audit(4, "foo.github.io", "1.0.0.4", 443),
    audit(5, "bar.github.io", "1.0.0.5", 443),
    audit(6, "example.org", "1.0.0.6", 443, event_type="connection_allowed"),
    audit(7, "api.example.org", "1.0.0.7", 443),
    audit(8, "www.example.org", "1.0.0.8", 80),
    audit(9, "", "203.0.113.9", 22),
    audit(10, "", "203.0.113.9", 53, "UDP"),
    audit(11, "", "198.51.100.7", 0, "ICMP", "protocol_blocked"),
    audit(12, "", "198.51.100.8", 0, "GRE", "protocol_blocked"),
    audit(13, "dualstack.fastly.net", "1.0.0.13", 443, event_type="connection_late_allowed",
          cname_chain=["pypi.org", "dualstack.fastly.net"]),
    audit(14, "", "2001:db8::1", 443),
    # A parent-domain rule outranks a glob: this group must be split back.
    audit(15, "example.net", "1.0.0.15", 443),
    audit(16, "x.cdn.example.net", "1.0.0.16", 8080),
    audit(17, "y.cdn.example.net", "1.0.0.17", 8080),
    # Left out: an auto-allowed resolver, an enforce-mode block, a row before --since.
    audit(18, "", "127.0.0.53", 53, "UDP", "connection_allowed", auto_allowed_type="dns"),
    audit(19, "evil.test", "6.6.6.6", 443, blocked=True, would_deny=False),
    audit(-10**12, "old.example", "7.7.7.7", 443),
]


@pytest.fixture
def store_url(db_url):
    store = AuditStore(db_url)
    store.migrate()
    store.write(ROWS)
    store.close()
    return db_url


def allowed_everywhere(document, seen):
    """Every seen connection: its name by the hostname rules, its address by the maps."""
    policy = policy_from_text(json.dumps(document), "draft")
    maps = DictRuleMaps()
    Firewall(maps).program(policy, False)
    for s in seen:
        ok = (name_allowed(policy, s.hostname, [PortSpec(s.port, s.protocol)])
              if s.hostname else maps.verdict(s.ip, s.port, PROTO_NUMBERS[s.protocol]) == ALLOW)
        assert ok, s
    return policy


def test_the_draft_groups_safely_and_allows_every_observed_connection(store_url):
    seen, left_out = seen_in(store_url, T, "")
    assert left_out == ["GRE to 198.51.100.8: only TCP, UDP and ICMP can be allowed"]
    assert {s.hostname for s in seen} >= {"pypi.org", ""}
    assert not {"evil.test", "old.example", "dualstack.fastly.net"} & {s.hostname for s in seen}
    assert "127.0.0.53" not in {s.ip for s in seen}
    document = draft_policy(seen)
    allowed_everywhere(document, seen)
    rules = {r["value"]: sorted((p["port"], p["protocol"]) for p in r["ports"])
             for r in document["rules"]}
    assert rules == {
        "*.cdn.example.com": [(443, "tcp"), (8443, "tcp")],
        "foo.github.io": [(443, "tcp")],       # github.io is a public suffix: never grouped
        "bar.github.io": [(443, "tcp")],
        "example.org": [(80, "tcp"), (443, "tcp")],  # grouped under the seen parent
        "pypi.org": [(443, "tcp")],
        "example.net": [(443, "tcp")],
        "x.cdn.example.net": [(8080, "tcp")],
        "y.cdn.example.net": [(8080, "tcp")],
        "203.0.113.9/32": [(22, "tcp"), (53, "udp")],
        "198.51.100.7/32": [(0, "icmp")],
        "2001:db8::1/128": [(443, "tcp")],
    }
    assert document["defaultAction"] == "deny"


def test_without_grouping_every_name_is_its_own_rule(store_url):
    seen, _ = seen_in(store_url, T, "")
    document = draft_policy(seen, min_siblings=0)
    allowed_everywhere(document, seen)
    assert "a.cdn.example.com" in {r["value"] for r in document["rules"]}


def test_since_and_host_narrow_what_is_seen(store_url):
    assert {s.hostname for s in seen_in(store_url, 0, "")[0]} >= {"old.example"}
    assert seen_in(store_url, T, "another-host") == ([], [])


def test_grouping_never_widens_to_a_public_suffix():
    seen = [Seen(f"{n}.co.uk", "1.1.1.1", 443, "tcp") for n in ("a", "b", "c")]
    values = {r["value"] for r in draft_policy(seen)["rules"]}
    assert values == {"a.co.uk", "b.co.uk", "c.co.uk"}


@pytest.mark.parametrize("text, expected", [
    ("90m", T - 90 * 60 * 10**9), ("7d", T - 7 * 86400 * 10**9),
    ("2026-01-01T01:00:00+01:00", T),
])
def test_since(text, expected):
    assert parse_since(text, T) == expected


def test_a_bad_since_is_one_line():
    with pytest.raises(SuggestError, match="--since"):
        parse_since("last week", T)


def test_policy_check_accepts_what_the_command_writes(store_url, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli.app import app

    runner = CliRunner()
    out = tmp_path / "draft.json"
    result = runner.invoke(app, ["suggest", "--db", store_url, "--since",
                                 "2026-01-01T00:00:00Z", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "not drafted: GRE to 198.51.100.8" in result.output
    check = runner.invoke(app, ["policy", "check", str(out)])
    assert check.exit_code == 0, check.output
    assert "*.cdn.example.com" in check.output
