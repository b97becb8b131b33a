"""Late-allow and DNS-answer writes against the dict-backed maps (reference §2.3, §5.4)."""

import pytest

from pipeline.events import EnrichedEvent, RawEvent
from pipeline.firewall.writer import Firewall
from pipeline.firewall.opening import allow_answer, plan_late_allow, write_plan
from pipeline.policy.load import policy_from_text
from pipeline.policy.mapstate import Grant
from pipeline.policy.verdict import PortSpec
from pipeline.rulemaps import ALLOW, DENY, DictRuleMaps

POLICY = """{"defaultAction": "deny", "rules": [
  {"type": "hostname", "value": "api.example.com", "action": "allow",
   "ports": [{"port": 443, "protocol": "tcp"}]},
  {"type": "hostname", "value": "*.cdn.example.net", "action": "allow"},
  {"type": "hostname", "value": "db", "action": "allow",
   "ports": [{"port": 443, "protocol": "all"}]},
  {"type": "hostname", "value": "db.corp.example.com", "action": "deny",
   "ports": [{"port": 443, "protocol": "udp"}]},
  {"type": "hostname", "value": "evil.example.com", "action": "deny"},
  {"type": "cidr", "value": "203.0.113.0/24", "action": "deny"}
], "searchDomains": [".corp.example.com"]}"""


@pytest.fixture
def setup():
    policy = policy_from_text(POLICY, "policy.json")
    maps = DictRuleMaps()
    firewall = Firewall(maps)
    firewall.program(policy, False)
    return policy, firewall, maps


def blocked(host, ip="198.51.100.7", port=443, proto=6, allowed=False):
    raw = RawEvent(4, allowed, proto, 0, "10.0.0.2", ip, 40000, port, 1, 9, "curl", 1, "", 0, "")
    return EnrichedEvent.from_raw(raw, host)


def late_allow(policy, firewall, event):
    """What the policy stage does with a blocked event: plan, write, and the allow rule when
    the event's own port is now open (else None)."""
    plan = plan_late_allow(policy, event)
    if plan is None or not write_plan(firewall, plan) or not plan.covers:
        return None
    return plan.rule


@pytest.mark.parametrize("host, port, proto, rule, verdict_after", [
    ("api.example.com", 443, 6, "api.example.com", ALLOW),     # covered: late-allowed
    ("api.example.com", 80, 6, None, DENY),                     # rule's ports only
    ("api.example.com", 443, 17, None, DENY),                   # tcp rule, udp packet
    ("x.cdn.example.net", 8443, 6, "*.cdn.example.net", ALLOW),  # glob, all ports
    # Mixed verdict (search-domain stripping): allow 443/all, deny 443/udp.
    ("db.corp.example.com", 443, 6, "db", ALLOW),
    ("db.corp.example.com", 443, 17, None, DENY),
    ("evil.example.com", 443, 6, None, DENY),                   # deny only
    ("unknown.example.com", 443, 6, None, DENY),
    ("", 443, 6, None, DENY),                                   # no name
])
def test_late_allow(setup, host, port, proto, rule, verdict_after):
    policy, firewall, maps = setup
    assert late_allow(policy, firewall, blocked(host, port=port, proto=proto)) == rule
    assert maps.verdict("198.51.100.7", port, proto) == verdict_after


def test_late_allow_writes_exactly_the_rules_ports(setup):
    policy, firewall, maps = setup
    late_allow(policy, firewall, blocked("api.example.com"))
    assert maps.verdict("198.51.100.7", 443, 6) == ALLOW
    assert maps.verdict("198.51.100.7", 22, 6) == DENY


def test_late_allow_respects_a_cidr_deny(setup):
    # The reference wrote a /32 allow over a CIDR deny; sluice runs the conflict check.
    policy, firewall, maps = setup
    assert late_allow(policy, firewall, blocked("api.example.com", ip="203.0.113.9")) is None
    assert maps.verdict("203.0.113.9", 443, 6) == DENY


@pytest.mark.parametrize("proto", [1, 47])
def test_late_allow_only_for_tcp_and_udp(setup, proto):
    policy, firewall, maps = setup
    assert late_allow(policy, firewall, blocked("x.cdn.example.net", proto=proto)) is None
    assert maps.port_entries == {} or maps.verdict("198.51.100.7", 443, 6) == DENY


def test_no_firewall_no_late_allow(setup):
    policy, _, _ = setup
    assert late_allow(policy, None, blocked("api.example.com")) is None


def test_allowed_events_are_not_late_allowed(setup):
    policy, firewall, _ = setup
    assert late_allow(policy, firewall, blocked("api.example.com", allowed=True)) is None


@pytest.mark.parametrize("host, port, proto, grants, covers", [
    ("api.example.com", 443, 6, [Grant("allow", (PortSpec(443, "tcp"),), "api.example.com")],
     True),
    ("api.example.com", 80, 6, [Grant("allow", (PortSpec(443, "tcp"),), "api.example.com")],
     False),  # the rule's ports are opened all the same; the event's own is not among them
    # Mixed verdict: the allow side minus the denied 443/udp (the deny side equals the
    # default, so it is not written), which leaves the event's own port closed.
    ("db.corp.example.com", 443, 17,
     [Grant("allow", (PortSpec(443, "tcp"), PortSpec(0, "icmp")), "db.corp.example.com")],
     False),
])
def test_a_plan_is_the_writes_and_whether_they_cover_the_event(
        setup, host, port, proto, grants, covers):
    policy, _, maps = setup
    before = (dict(maps.cidr_entries), dict(maps.port_entries))
    plan = plan_late_allow(policy, blocked(host, port=port, proto=proto))
    assert (list(plan.grants), plan.covers, plan.ip) == (grants, covers, "198.51.100.7")
    assert (maps.cidr_entries, maps.port_entries) == before  # planning writes nothing


@pytest.mark.parametrize("host, ip, proto, allowed", [
    ("evil.example.com", "198.51.100.7", 6, False),  # deny only
    ("nobody.example", "198.51.100.7", 6, False),    # no rule
    ("", "198.51.100.7", 6, False),                  # no name
    ("api.example.com", "203.0.113.9", 6, False),    # a CIDR deny wins: nothing to write
    ("x.cdn.example.net", "198.51.100.7", 47, False),  # not TCP or UDP
    ("api.example.com", "198.51.100.7", 6, True),    # the kernel allowed it
])
def test_no_plan_where_late_allow_asks_nothing(setup, host, ip, proto, allowed):
    policy, _, _ = setup
    assert plan_late_allow(policy, blocked(host, ip=ip, proto=proto, allowed=allowed)) is None


def test_a_plan_without_maps_is_not_written(setup):
    policy, _, _ = setup
    assert write_plan(None, plan_late_allow(policy, blocked("api.example.com"))) is False


def test_allow_answer_opens_every_address_for_the_rule(setup):
    policy, firewall, maps = setup
    writes = allow_answer(policy, firewall, "api.example.com", ["192.0.2.1", "192.0.2.2"])
    assert writes.allowed_ips == ["192.0.2.1", "192.0.2.2"]
    assert writes.verdict.allow_rule == "api.example.com"
    assert all(maps.verdict(ip, 443, 6) == ALLOW for ip in writes.allowed_ips)


def test_allow_answer_for_a_denied_or_unknown_name_writes_no_allow(setup):
    policy, firewall, maps = setup
    assert allow_answer(policy, firewall, "evil.example.com", ["192.0.2.3"]).allowed_ips == []
    assert allow_answer(policy, firewall, "nobody.example", ["192.0.2.4"]).allowed_ips == []
    assert maps.verdict("192.0.2.3", 443, 6) == DENY


def test_allow_equal_to_the_default_is_not_written():
    policy = policy_from_text('{"defaultAction": "allow", "rules": [{"type": "hostname", '
                              '"value": "a.example.com", "action": "allow"}]}', "p")
    maps = DictRuleMaps()
    firewall = Firewall(maps)
    firewall.program(policy, False)
    assert allow_answer(policy, firewall, "a.example.com", ["192.0.2.9"]).allowed_ips == []
    assert maps.cidr_entries == {}



def P(port, protocol="all"):
    from pipeline.policy.verdict import PortSpec
    return PortSpec(port, protocol)


@pytest.mark.parametrize("allow, deny, left", [
    ((P(443),), (P(443, "udp"),), (P(443, "tcp"), P(0, "icmp"))),
    ((P(443),), (P(80),), (P(443),)),
    ((P(443, "tcp"),), (P(443, "tcp"),), None),
    ((P(443, "tcp"), P(80, "tcp")), (P(443, "all"),), (P(80, "tcp"),)),
    ((), (P(443),), ()),            # all-ports allow: the maps cannot subtract
    ((P(443),), (), None),           # an all-ports deny leaves nothing to allow
])
def test_allow_ports_minus_the_deny_side(allow, deny, left):
    from pipeline.policy.ports import without_denied
    assert without_denied(allow, deny) == left
