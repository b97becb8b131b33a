"""RecentBlocks: reconciling earlier blocks when a DNS answer opens the firewall (§2.8)."""

import pytest

from pipeline.audit.records import AuditEvent
from pipeline.policy.verdict import PortSpec
from pipeline.firewall.recentblocks import RecentBlocks, late_allowed_record

S = 1_000_000_000
TCP443 = (PortSpec(443, "tcp"),)


def block(ip="192.0.2.1", port=443, protocol="TCP", at=10 * S, src="10.0.0.2", process="curl",
          pid=7, event_type="connection_blocked", cgroup="", container=""):
    return AuditEvent(timestamp=at, event_type=event_type, src_ip=src, dst_ip=ip, dst_port=port,
                      protocol=protocol, process=process, pid=pid, cgroup=cgroup,
                      container=container)


@pytest.mark.parametrize("event", [
    block(event_type="connection_allowed"), block(event_type="protocol_blocked"),
    block(protocol="ICMP"), block(ip=""),
])
def test_only_tcp_udp_connection_blocks_are_kept(event):
    recent = RecentBlocks()
    recent.remember(event, 10 * S)
    assert recent.size == 0


@pytest.mark.parametrize("allow, deny, has_deny, taken", [
    ((), (), False, 1),                     # all ports
    (TCP443, (), False, 1),
    ((PortSpec(443, "udp"),), (), False, 0),
    ((PortSpec(443, "all"),), (), False, 1),
    (TCP443, (), True, 0),                  # has_deny with an empty list denies all ports
    (TCP443, (PortSpec(80, "tcp"),), True, 1),
    (TCP443, (PortSpec(443, "all"),), True, 0),
])
def test_take_by_port_coverage(allow, deny, has_deny, taken):
    recent = RecentBlocks()
    recent.remember(block(), 10 * S)
    assert len(recent.take("192.0.2.1", allow, deny, has_deny, 11 * S)) == taken


def test_covered_entries_are_removed_even_when_denied():
    recent = RecentBlocks()
    recent.remember(block(), 10 * S)
    recent.take("192.0.2.1", TCP443, (), True, 11 * S)
    assert recent.size == 0 and recent.keys_by_ip == {}


def test_expired_blocks_are_not_reconciled():
    recent = RecentBlocks(ttl_ns=5 * S)
    recent.remember(block(at=10 * S), 10 * S)
    assert recent.take("192.0.2.1", (), (), False, 16 * S) == []
    assert recent.size == 0


def test_repeated_attempts_keep_the_latest_time_and_blank_disagreements():
    recent = RecentBlocks()
    recent.remember(block(at=10 * S, pid=7, process="curl"), 10 * S)
    recent.remember(block(at=12 * S, pid=8, process="curl"), 12 * S)
    recent.remember(block(at=11 * S, pid=7, process="wget"), 12 * S)
    [entry] = recent.take("192.0.2.1", (), (), False, 13 * S)
    assert (entry.at, entry.pid, entry.process, entry.src_ip) == (12 * S, 0, "", "10.0.0.2")


def test_the_container_of_a_block_reaches_its_late_allowed_record_unless_attempts_disagree():
    one, two = "/docker/" + "a" * 64, "/docker/" + "b" * 64
    recent = RecentBlocks()
    recent.remember(block(at=10 * S, cgroup=one, container="a" * 64), 10 * S)
    recent.remember(block(at=11 * S, cgroup=one, container="a" * 64), 11 * S)
    [entry] = recent.take("192.0.2.1", (), (), False, 12 * S)
    record = late_allowed_record(entry, "api.example.com", "*.example.com", [])
    assert (record.cgroup, record.container) == (one, "a" * 64)
    recent.remember(block(at=12 * S, cgroup=one, container="a" * 64), 12 * S)
    recent.remember(block(at=13 * S, cgroup=two, container="b" * 64), 13 * S)
    [entry] = recent.take("192.0.2.1", (), (), False, 14 * S)
    assert (entry.cgroup, entry.container) == ("", "")


def test_capacity_prunes_expired_then_drops_new_keys():
    recent = RecentBlocks(ttl_ns=5 * S, capacity=2)
    recent.remember(block(port=1, at=1 * S), 1 * S)
    recent.remember(block(port=2, at=9 * S), 9 * S)
    recent.remember(block(port=3, at=9 * S), 9 * S)   # prunes port 1 (expired)
    recent.remember(block(port=4, at=9 * S), 9 * S)   # full of live entries: dropped
    assert recent.size == 2 and recent.dropped == 1
    recent.remember(block(port=2, at=10 * S), 10 * S)  # refreshing a key always works
    ports = [b.dst_port for b in recent.take("192.0.2.1", (), (), False, 10 * S)]
    assert ports == [3, 2]


def test_a_full_set_refuses_until_its_oldest_entry_expires_even_when_a_refresh_moves_it():
    recent = RecentBlocks(ttl_ns=5 * S, capacity=2)
    recent.remember(block(port=1, at=9 * S), 9 * S)
    recent.remember(block(port=2, at=3 * S), 9 * S)    # dated earlier, kept second
    recent.remember(block(port=3, at=10 * S), 10 * S)  # full, port 1 live: refused
    recent.remember(block(port=4, at=11 * S), 11 * S)  # still refused
    assert recent.dropped == 2
    recent.remember(block(port=1, at=11 * S), 11 * S)  # refreshed: port 2 is oldest now
    recent.remember(block(port=5, at=12 * S), 12 * S)  # port 2 expired: pruned, 5 kept
    assert recent.dropped == 2
    assert [b.dst_port for b in recent.take("192.0.2.1", (), (), False, 12 * S)] == [1, 5]
    recent.remember(block(port=6, at=13 * S), 13 * S)  # empty again: kept
    assert recent.size == 1


def test_late_allowed_record_is_dated_at_the_block():
    recent = RecentBlocks()
    recent.remember(block(at=10 * S), 10 * S)
    [entry] = recent.take("192.0.2.1", (), (), False, 20 * S)
    record = late_allowed_record(entry, "api.example.com", "*.example.com", ["a", "b"])
    assert (record.timestamp, record.event_type, record.dst_hostname, record.matched_rule) == (
        10 * S, "connection_late_allowed", "api.example.com", "*.example.com")
    assert (record.dst_port, record.protocol, record.process, record.cname_chain) == (
        443, "TCP", "curl", ["a", "b"])
