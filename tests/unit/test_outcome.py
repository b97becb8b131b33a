"""processEvent's outcome table (reference §2.4), normalization at creation, and the
late-allow plan the decision hands the policy stage (it writes nothing itself)."""

import json

import msgspec
import pytest

from pipeline.events import EnrichedEvent, RawEvent
from pipeline.firewall.outcome import decide
from pipeline.policy.load import policy_from_text
from pipeline.policy.mapstate import Grant
from pipeline.policy.verdict import PortSpec

T0 = 1_764_000_000_123_456_789
RULES = [{"type": "hostname", "value": "x.com", "action": "allow",
          "ports": [{"port": 443, "protocol": "tcp"}, {"port": 53, "protocol": "udp"}]},
         {"type": "cidr", "value": "93.184.216.0/24", "action": "allow",
          "ports": [{"port": 8080, "protocol": "tcp"}], "autoAddedType": "dns"}]
POLICY = policy_from_text(json.dumps({"defaultAction": "deny", "rules": RULES}), "p")


def event(allowed=False, proto=6, src_port=40000, dst_port=443, flags=0, host="", **kw):
    raw = RawEvent(4, allowed, proto, flags, "10.0.0.2", "93.184.216.34", src_port, dst_port,
                   T0, 321, "curl", kw.pop("packets", 1), "", 0,
                   kw.pop("cgroup", ""))
    return EnrichedEvent.from_raw(raw, host, kw.pop("chain", None))


def run(ev, audit=False):
    return decide(ev, POLICY, audit_mode=audit, event_id="id-1", host="h1")


@pytest.mark.parametrize("ev, expected_type, notify", [
    (event(allowed=True), "connection_allowed", False),
    (event(allowed=True, host="x.com"), "connection_allowed", False),
    (event(proto=47, src_port=0, dst_port=47), "protocol_blocked", True),
    (event(proto=1, src_port=0, dst_port=1), "protocol_blocked", True),
    # Non-first UDP fragment: protocol-block shape wins over late-allow.
    (event(proto=17, src_port=0, dst_port=0, host="x.com"), "protocol_blocked", True),
    (event(host="x.com"), "connection_late_allowed", False),
    (event(host="y.com"), "connection_blocked", True),
    (event(proto=17, src_port=5353, dst_port=53), "connection_blocked", True),
])
def test_outcome_table(ev, expected_type, notify):
    outcome = run(ev)
    assert outcome.record.event_type == expected_type
    assert outcome.notify is notify


@pytest.mark.parametrize("audit, expected", [(True, (True, False)), (False, (False, True))])
def test_blocks_are_normalized_by_mode(audit, expected):
    record = run(event(), audit=audit).record
    assert (record.would_deny, record.blocked) == expected


@pytest.mark.parametrize("audit", [True, False])
@pytest.mark.parametrize("allowed", [True, False])
def test_allowed_and_late_allowed_keep_false_flags(audit, allowed):
    ev = event(allowed=allowed, host="x.com")
    record = run(ev, audit=audit).record
    assert (record.would_deny, record.blocked) == (False, False)


def test_protocol_block_names_the_protocol_and_clears_the_port():
    record = run(event(proto=47, src_port=0, dst_port=47)).record
    assert (record.protocol, record.dst_port) == ("GRE", 0)
    record = run(event(proto=200, src_port=0, dst_port=200)).record
    assert record.protocol == "Protocol-200"


def test_record_carries_the_event_fields():
    record = run(event(allowed=True, host="example.com", packets=3, chain=["a.com", "b.net"],
                       dst_port=8080)).record
    assert (record.timestamp, record.src_ip, record.dst_ip, record.dst_hostname) == (
        T0, "10.0.0.2", "93.184.216.34", "example.com")
    assert (record.dst_port, record.protocol, record.process, record.pid) == (
        8080, "TCP", "curl", 321)
    assert (record.packets, record.cname_chain, record.auto_allowed_type) == (
        3, ["a.com", "b.net"], "dns")
    assert (record.event_id, record.host) == ("id-1", "h1")


@pytest.mark.parametrize("cgroup, container", [
    ("/system.slice/docker-" + "a" * 64 + ".scope", "a" * 64),
    ("/docker/" + "b" * 64, "b" * 64),
    ("/machine.slice/libpod-" + "c" * 64 + ".scope/container", "c" * 64),
    ("/system.slice/docker-" + "d" * 64 + ".scope/kubelet.slice/kubelet-kubepods.slice/"
     "cri-containerd-" + "e" * 64 + ".scope", "e" * 64),   # kind: the innermost
    ("/user.slice/user-1000.slice/session-2.scope", ""),
    ("/system.slice/docker-" + "a" * 63 + ".scope", ""),
    ("/x/" + "f" * 65, ""),
    ("", ""),
])
def test_records_carry_the_cgroup_and_the_container_found_in_it(cgroup, container):
    for allowed in (True, False):
        record = run(event(allowed=allowed, cgroup=cgroup)).record
        assert (record.cgroup, record.container) == (cgroup, container)


def test_mid_stream_block_is_flagged():
    assert run(event(flags=1)).record.mid_stream is True
    assert run(event(flags=0)).record.mid_stream is False


def test_late_allow_records_the_rule():
    assert run(event(host="api.x.com")).record.matched_rule == "x.com"


# ------------------------------------------------------------------ the late-allow plan

X_GRANT = Grant("allow", (PortSpec(443, "tcp"), PortSpec(53, "udp")), "x.com")


def test_a_late_allow_is_a_plan_and_the_block_that_stands_if_it_cannot_be_written():
    outcome = run(event(host="x.com"))
    assert (outcome.late_allow.ip, outcome.late_allow.grants) == ("93.184.216.34", (X_GRANT,))
    assert outcome.settled(True) is outcome
    unwritten = outcome.settled(False)
    assert (unwritten.record.event_type, unwritten.notify) == ("connection_blocked", True)
    assert unwritten.record.blocked and not unwritten.record.matched_rule
    assert (unwritten.record.event_id, unwritten.record.dst_port) == ("id-1", 443)


def test_a_block_the_rule_does_not_cover_still_plans_the_rules_ports():
    outcome = run(event(host="x.com", dst_port=80))
    assert (outcome.record.event_type, outcome.notify) == ("connection_blocked", True)
    assert outcome.late_allow.grants == (X_GRANT,) and not outcome.late_allow.covers
    assert outcome.settled(False) is outcome.settled(True) is outcome


@pytest.mark.parametrize("ev", [event(allowed=True, host="x.com"), event(host="y.com"),
                                event(proto=17, src_port=0, dst_port=0, host="x.com")])
def test_no_plan_where_late_allow_has_nothing_to_write(ev):
    outcome = run(ev)
    assert outcome.late_allow is None and outcome.settled(False) is outcome


def test_a_blocks_record_carries_each_field_of_its_event_under_its_own_name():
    """The record is built positionally (per event, keywords cost six times as much): a
    field added or moved in AuditEvent must not shift the values into other columns."""
    cgroup = "/system.slice/docker-" + "c" * 64 + ".scope"
    raw = RawEvent(4, False, 17, 1, "10.0.0.2", "93.184.216.34", 40000, 9999, T0, 321,
                   "curl", 7, "j-000000000005", 5, cgroup)
    record = run(EnrichedEvent.from_raw(raw, "y.com", ["y.com", "edge.y.net"])).record
    assert msgspec.structs.asdict(record) == {
        "timestamp": T0, "event_type": "connection_blocked", "src_ip": "10.0.0.2",
        "dst_ip": "93.184.216.34", "dst_hostname": "y.com", "dst_port": 9999,
        "protocol": "UDP", "process": "curl", "pid": 321, "matched_rule": "",
        "auto_allowed_type": "", "cname_chain": ["y.com", "edge.y.net"], "mid_stream": True,
        "would_deny": False, "blocked": True, "packets": 7, "event_id": "id-1", "host": "h1",
        "seq": 5, "cgroup": cgroup, "container": "c" * 64}
