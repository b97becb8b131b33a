"""Connections open at start-up: /proc/net parsing and the gate per address (reference §6.3)."""

import pytest

from pipeline.policy.existing import gate_existing_connection, parse_proc_net, scan_connections
from tests.support.policykit import make_policy, specs

HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
          "timeout inode")


def proc_net(*rows):
    """rows of (remote hex address, port, state hex) as the kernel prints them."""
    lines = [HEADER]
    for i, (address, port, state) in enumerate(rows):
        local = "0F02000A" if len(address) == 8 else "0" * 32
        lines.append(f"  {i:3d}: {local}:D5C8 {address}:{port:04X} {state} "
                     "00000000:00000000 00:00000000 00000000  1000        0 4242 1")
    return "\n".join(lines) + "\n"


V6_DOC = "B80D0120000000000000000001000000"            # 2001:db8::1
V4_MAPPED = "0000000000000000FFFF000022D8B85D"           # ::ffff:93.184.216.34
V6_LOOPBACK = "00000000000000000000000001000000"        # ::1
V6_LINK_LOCAL = "000080FE000000000000000001000000"      # fe80::1

ROWS = [
    ("tcp", [("22D8B85D", 443, "01")], {"93.184.216.34": {(443, "tcp")}}),
    ("tcp", [("22D8B85D", 443, "02"), ("22D8B85D", 80, "03")],
     {"93.184.216.34": {(443, "tcp"), (80, "tcp")}}),
    ("tcp", [("22D8B85D", 443, "06"), ("22D8B85D", 443, "0A"), ("22D8B85D", 443, "08")], {}),
    ("tcp", [("0100007F", 53, "01"), ("00000000", 0, "01"), ("0101FEA9", 80, "01")], {}),
    ("udp", [("08080808", 53, "01"), ("08080808", 53, "07")], {"8.8.8.8": {(53, "udp")}}),
    ("tcp", [(V6_DOC, 443, "01")], {"2001:db8::1": {(443, "tcp")}}),
    ("tcp", [(V4_MAPPED, 8443, "01")], {"93.184.216.34": {(8443, "tcp")}}),
    ("tcp", [(V6_LOOPBACK, 443, "01"), (V6_LINK_LOCAL, 443, "01")], {}),
    ("tcp", [("0000007F", 443, "01")], {}),
]


@pytest.mark.parametrize("protocol, rows, expected", ROWS)
def test_parse_proc_net(protocol, rows, expected):
    assert parse_proc_net(proc_net(*rows), protocol) == expected


def test_scan_merges_all_four_files_into_sorted_distinct_ports():
    scanned = scan_connections(
        tcp=proc_net(("22D8B85D", 443, "01"), ("22D8B85D", 80, "01")),
        tcp6=proc_net((V4_MAPPED, 443, "01")),
        udp=proc_net(("22D8B85D", 443, "01")),
        udp6="")
    assert scanned == {"93.184.216.34": [(80, "tcp"), (443, "tcp"), (443, "udp")]}


GATES = [
    ([], "", [(443, "tcp")], True, "", [("allow", "443/tcp")]),
    (["deny example.com"], "example.com", [(443, "tcp")], False, "example.com", []),
    (["deny example.com"], "", [(443, "tcp")], True, "", [("allow", "443/tcp")]),
    (["allow example.com 8443/tcp"], "api.example.com", [(443, "tcp")], True, "example.com",
     [("allow", "8443/tcp")]),
    (["allow example.com"], "api.example.com", [(443, "tcp")], True, "example.com",
     [("allow", "")]),
    (["allow db.corp.example.com", "deny db 5432/tcp"], "db.corp.example.com",
     [(5432, "tcp")], True, "db", [("deny", "5432/tcp"), ("allow", "")]),
    (["deny example.com 22/tcp"], "example.com", [(443, "tcp")], False, "example.com", []),
    (["allow *.example.com"], "a.example.com", [(443, "tcp")], True, "a.example.com",
     [("allow", "")]),
]


@pytest.mark.parametrize("rules, hostname, observed, allowed, matched, writes", GATES)
def test_gate_existing_connection(rules, hostname, observed, allowed, matched, writes):
    plan = gate_existing_connection(make_policy(*rules, domains=[".corp.example.com"]),
                                    "192.0.2.7", observed, hostname)
    assert (plan.allowed, plan.matched_rule, plan.dst_hostname) == (allowed, matched, hostname)
    assert plan.writes == tuple((action, specs(ports)) for action, ports in writes)
