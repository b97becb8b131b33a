"""processEvent's outcome table (reference §2.4) and normalization at creation."""

import pytest

from pipeline.events import EnrichedEvent, RawEvent
from pipeline.outcome import decide

T0 = 1_764_000_000_123_456_789


def event(allowed=False, proto=6, src_port=40000, dst_port=443, flags=0, host="", **kw):
    raw = RawEvent(4, allowed, proto, flags, "10.0.0.2", "93.184.216.34", src_port, dst_port,
                   T0, 321, "curl", kw.pop("packets", 1), "", 0,
                   kw.pop("cgroup", ""))
    return EnrichedEvent.from_raw(raw, host, kw.pop("chain", None))


def run(ev, audit=False, late=None, auto=""):
    return decide(ev, audit_mode=audit, event_id="id-1", host="h1",
                  auto_allowed_type=lambda *a: auto, late_allow=lambda e: late)


@pytest.mark.parametrize("ev, late, expected_type, notify", [
    (event(allowed=True), None, "connection_allowed", False),
    (event(allowed=True), "x.com", "connection_allowed", False),
    (event(proto=47, src_port=0, dst_port=47), None, "protocol_blocked", True),
    (event(proto=1, src_port=0, dst_port=1), None, "protocol_blocked", True),
    # Non-first UDP fragment: protocol-block shape wins over late-allow.
    (event(proto=17, src_port=0, dst_port=0), "x.com", "protocol_blocked", True),
    (event(host="x.com"), "x.com", "connection_late_allowed", False),
    (event(host="x.com"), None, "connection_blocked", True),
    (event(proto=17, src_port=5353, dst_port=53), None, "connection_blocked", True),
])
def test_outcome_table(ev, late, expected_type, notify):
    outcome = run(ev, late=late)
    assert outcome.record.event_type == expected_type
    assert outcome.notify is notify


@pytest.mark.parametrize("audit, expected", [(True, (True, False)), (False, (False, True))])
def test_blocks_are_normalized_by_mode(audit, expected):
    record = run(event(), audit=audit).record
    assert (record.would_deny, record.blocked) == expected


@pytest.mark.parametrize("audit", [True, False])
@pytest.mark.parametrize("late", [None, "x.com"])
def test_allowed_and_late_allowed_keep_false_flags(audit, late):
    ev = event(allowed=late is None, host="x.com")
    record = run(ev, audit=audit, late=late).record
    assert (record.would_deny, record.blocked) == (False, False)


def test_protocol_block_names_the_protocol_and_clears_the_port():
    record = run(event(proto=47, src_port=0, dst_port=47)).record
    assert (record.protocol, record.dst_port) == ("GRE", 0)
    record = run(event(proto=200, src_port=0, dst_port=200)).record
    assert record.protocol == "Protocol-200"


def test_record_carries_the_event_fields():
    record = run(event(allowed=True, host="example.com", packets=3, chain=["a.com", "b.net"]),
                 auto="dns").record
    assert (record.timestamp, record.src_ip, record.dst_ip, record.dst_hostname) == (
        T0, "10.0.0.2", "93.184.216.34", "example.com")
    assert (record.dst_port, record.protocol, record.process, record.pid) == (
        443, "TCP", "curl", 321)
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
    assert run(event(host="api.x.com"), late="*.x.com").record.matched_rule == "*.x.com"
