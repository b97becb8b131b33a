"""The map writer: accumulator, static rules, and reload by diff (reference §4), checked
against DictRuleMaps' model of the classifier's lookup."""

import ipaddress
import random

import pytest

from pipeline.firewall.writer import Firewall, apply_existing_connection
from pipeline.policy.existing import gate_existing_connection
from pipeline.rulemaps import ALLOW, DENY, DictRuleMaps
from tests.support.policykit import make_policy, specs

TCP, UDP, ICMP = 6, 17, 1
net = ipaddress.ip_network


class RecordingMaps(DictRuleMaps):
    """DictRuleMaps that records every write and runs a check after each one."""

    def __init__(self):
        super().__init__()
        self.operations = []
        self.after_each = None

    def _done(self, *operation):
        self.operations.append(operation)
        if self.after_each:
            self.after_each(operation)

    def set_config(self, default_action, audit_mode, generation):
        super().set_config(default_action, audit_mode, generation)
        self._done("set_config", default_action, audit_mode)

    def put_cidr(self, network, action, port_specific):
        super().put_cidr(network, action, port_specific)
        self._done("put_cidr", network, action, port_specific)

    def delete_cidr(self, network):
        super().delete_cidr(network)
        self._done("delete_cidr", network)

    def put_port(self, network, port, proto, action):
        super().put_port(network, port, proto, action)
        self._done("put_port", network, port, proto, action)

    def delete_port(self, network, port, proto):
        super().delete_port(network, port, proto)
        self._done("delete_port", network, port, proto)


def firewall(*rules, default="deny"):
    maps = RecordingMaps()
    fw = Firewall(maps)
    fw.program(make_policy(*rules, default=default), audit_mode=False)
    return fw, maps


# ------------------------------------------------------------------ the accumulator

# Each step: (action, ports, expected return); then the host's LPM value and port entries.
ACCUMULATOR = [
    ([("allow", "", True)], (ALLOW, False), {}),
    ([("allow", "443/tcp", True)], (ALLOW, True), {(443, TCP): ALLOW}),
    ([("allow", "443/tcp", True), ("allow", "443/tcp", False)], (ALLOW, True),
     {(443, TCP): ALLOW}),
    ([("allow", "443/tcp", True), ("allow", "80/tcp", True)], (ALLOW, True),
     {(443, TCP): ALLOW, (80, TCP): ALLOW}),
    ([("allow", "", True), ("allow", "443/tcp", False)], (ALLOW, False), {}),
    ([("allow", "443/tcp", True), ("allow", "", True)], (ALLOW, False), {(443, TCP): ALLOW}),
    ([("allow", "", True), ("deny", "", True), ("allow", "", False)], (DENY, False), {}),
    ([("deny", "", True), ("allow", "", False)], (DENY, False), {}),
    ([("allow", "", True), ("deny", "22/tcp", False)], (ALLOW, False), {}),
    # The LPM action of a port-specific entry is the last call's (parity), though unused.
    ([("deny", "443/tcp", True), ("allow", "443/tcp", True)], (ALLOW, True),
     {(443, TCP): DENY}),
    ([("deny", "22/tcp", True), ("allow", "443/tcp", True)], (ALLOW, True),
     {(22, TCP): DENY, (443, TCP): ALLOW}),
    ([("allow", "443/all", True)], (ALLOW, True),
     {(0, ICMP): ALLOW, (443, TCP): ALLOW, (443, UDP): ALLOW}),
    ([("allow", "0/icmp 53/udp", True)], (ALLOW, True), {(0, ICMP): ALLOW, (53, UDP): ALLOW}),
    ([("deny", "443/tcp", True), ("deny", "", True)], (DENY, False), {(443, TCP): DENY}),
]


@pytest.mark.parametrize("steps, lpm, ports", ACCUMULATOR)
def test_accumulator(steps, lpm, ports):
    fw, maps = firewall()
    for action, port_list, changed in steps:
        assert fw.add_ip("192.0.2.7", action, specs(port_list)) is changed
    host = net("192.0.2.7/32")
    assert maps.get_cidr(host) == lpm
    assert {(p, pr): a for (n, p, pr), a in maps.port_entries.items() if n == host} == ports


@pytest.mark.parametrize("ports, changed, entries", [
    ("443/all", True, {(443, TCP), (443, UDP)}),
    ("0/icmp", False, set()),
    ("0/icmp 443/tcp", True, {(443, TCP)}),
])
def test_ipv6_never_gets_icmp_entries(ports, changed, entries):
    fw, maps = firewall()
    assert fw.add_ip("2001:db8::7", "allow", specs(ports)) is changed
    host = net("2001:db8::7/128")
    assert {(p, pr) for (n, p, pr) in maps.port_entries if n == host} == entries
    assert (maps.get_cidr(host) is not None) is changed
    assert (host in fw.runtime) is changed


def test_ipv4_mapped_addresses_are_keyed_as_ipv4():
    fw, maps = firewall()
    fw.add_ip("::ffff:192.0.2.9", "allow", ())
    assert maps.get_cidr(net("192.0.2.9/32")) == (ALLOW, False)


def test_unknown_protocol_fails_closed():
    fw, _ = firewall()
    with pytest.raises(ValueError):
        fw.add_ip("192.0.2.7", "allow", specs("443/sctp"))


def test_remove_ip_forgets_everything_about_the_address():
    fw, maps = firewall()
    fw.add_ip("192.0.2.7", "allow", specs("443/tcp 80/tcp"))
    fw.remove_ip("192.0.2.7")
    fw.remove_ip("192.0.2.8")
    assert maps.cidr_entries == {} and maps.port_entries == {}
    assert fw.add_ip("192.0.2.7", "allow", specs("443/tcp")) is True


# ------------------------------------------------------------------ static rules

VERDICTS = [
    (["allow 10.0.0.0/8 443/tcp"], "deny",
     [("10.1.2.3", 443, TCP, ALLOW), ("10.255.255.254", 443, TCP, ALLOW),
      ("10.0.0.1", 443, TCP, ALLOW), ("10.1.2.3", 80, TCP, DENY), ("10.1.2.3", 443, UDP, DENY),
      ("11.0.0.1", 443, TCP, DENY)]),
    (["deny 10.0.0.0/8 22/tcp"], "allow",
     [("10.4.5.6", 22, TCP, DENY), ("10.4.5.6", 443, TCP, ALLOW), ("11.0.0.1", 22, TCP, ALLOW)]),
    (["allow 0.0.0.0/0 53/udp"], "deny",
     [("1.1.1.1", 53, UDP, ALLOW), ("9.9.9.9", 53, UDP, ALLOW), ("9.9.9.9", 53, TCP, DENY),
      ("2001:db8::1", 53, UDP, DENY)]),
    (["allow ::/0 443/tcp"], "deny",
     [("2001:db8::1", 443, TCP, ALLOW), ("1.1.1.1", 443, TCP, DENY)]),
    (["allow 0.0.0.0/0"], "deny", [("1.1.1.1", 80, TCP, ALLOW), ("2001:db8::1", 80, TCP, DENY)]),
    (["allow 10.0.0.0/8", "deny 10.1.0.0/16"], "deny",
     [("10.2.0.1", 80, TCP, ALLOW), ("10.1.0.1", 80, TCP, DENY)]),
    (["allow 10.0.0.0/8 443/tcp", "deny 10.1.2.0/24 443/tcp"], "deny",
     [("10.1.2.9", 443, TCP, DENY), ("10.1.3.9", 443, TCP, ALLOW)]),
    (["allow 10.0.0.0/8 443/tcp", "allow 10.1.0.0/16 80/tcp"], "deny",
     [("10.1.2.3", 443, TCP, ALLOW), ("10.1.2.3", 80, TCP, ALLOW), ("10.2.2.3", 80, TCP, DENY)]),
    (["allow 10.0.0.0/8 443/all"], "deny", [("10.1.2.3", 0, ICMP, ALLOW)]),
    (["allow 192.0.2.7 443/tcp"], "deny",
     [("192.0.2.7", 443, TCP, ALLOW), ("192.0.2.7", 80, TCP, DENY), ("192.0.2.8", 443, TCP, DENY)]),
    (["allow 10.0.0.0/8 443/tcp", "deny 10.0.0.0/8 443/tcp"], "allow",
     [("10.1.2.3", 443, TCP, DENY)]),
    (["deny 10.0.0.0/8 443/tcp", "allow 10.0.0.0/8 443/tcp"], "allow",
     [("10.1.2.3", 443, TCP, DENY)]),
    (["allow 2001:db8::/32 443/tcp"], "deny",
     [("2001:db8:1::5", 443, TCP, ALLOW), ("2001:db9::5", 443, TCP, DENY)]),
]


@pytest.mark.parametrize("rules, default, probes", VERDICTS)
def test_static_rules_work_for_every_address(rules, default, probes):
    _, maps = firewall(*rules, default=default)
    for ip, port, proto, expected in probes:
        assert maps.verdict(ip, port, proto) == expected, (ip, port, proto)


def test_wildcards_have_no_cidr_entry():
    _, maps = firewall("allow 0.0.0.0/0 53/udp", "allow ::/0 443/tcp")
    assert maps.cidr_entries == {}
    assert set(maps.port_entries) == {(net("0.0.0.0/0"), 53, UDP), (net("::/0"), 443, TCP)}


def test_a_dns_host_entry_shadows_a_broader_cidr_deny():
    fw, maps = firewall("deny 10.0.0.0/8")
    fw.add_ip("10.1.2.3", "allow", specs("443/tcp"), hostname="internal.example.com")
    assert maps.verdict("10.1.2.3", 443, TCP) == ALLOW
    assert maps.verdict("10.1.2.3", 80, TCP) == DENY


def test_sync_is_add_only():
    maps = DictRuleMaps()
    fw = Firewall(maps)
    fw.sync(make_policy("allow 10.0.0.0/8"))
    fw.sync(make_policy("allow 11.0.0.0/8"))
    assert set(maps.cidr_entries) == {net("10.0.0.0/8"), net("11.0.0.0/8")}


def test_switches_and_generation():
    maps = DictRuleMaps()
    fw = Firewall(maps)
    fw.set_default_action("allow")
    fw.set_audit_mode(True)
    assert maps.get_config() == (ALLOW, True, 0)
    assert fw.mark_programmed() == 1
    fw.program(make_policy(default="deny"), audit_mode=False)
    assert maps.get_config() == (DENY, False, 1)


# ------------------------------------------------------------------ existing connections


@pytest.mark.parametrize("rules, hostname, observed, allowed, logged, probes", [
    ([], "", [(443, "tcp")], True, True, [(443, TCP, ALLOW), (80, TCP, DENY)]),
    (["deny example.com"], "example.com", [(443, "tcp")], False, True, [(443, TCP, DENY)]),
    (["allow example.com 8443/tcp"], "example.com", [(443, "tcp")], True, True,
     [(8443, TCP, ALLOW), (443, TCP, DENY)]),
    (["allow 192.0.2.7"], "", [(443, "tcp")], True, False, [(443, TCP, ALLOW)]),
    (["deny 192.0.2.0/24"], "", [(53, "udp")], True, True, [(53, UDP, ALLOW)]),
])
def test_existing_connections(rules, hostname, observed, allowed, logged, probes):
    fw, maps = firewall(*rules)
    plan = gate_existing_connection(fw.policy, "192.0.2.7", observed, hostname)
    assert plan.allowed is allowed
    assert apply_existing_connection(fw, plan) is logged
    for port, proto, expected in probes:
        assert maps.verdict("192.0.2.7", port, proto) == expected


# ------------------------------------------------------------------ reload by diff


def test_reload_adds_and_removes_by_diff_leaving_unchanged_entries_alone():
    fw, maps = firewall("allow 10.0.0.0/8", "allow 11.0.0.0/8 443/tcp")
    maps.operations.clear()
    fw.program(make_policy("allow 10.0.0.0/8", "allow 12.0.0.0/8"), audit_mode=False)
    assert set(maps.operations) == {
        ("put_cidr", net("12.0.0.0/8"), ALLOW, False),
        ("delete_cidr", net("11.0.0.0/8")),
        ("delete_port", net("11.0.0.0/8"), 443, TCP),
    }


@pytest.mark.parametrize("new_rules, expected", [
    (["allow github.com 443/tcp"], {(443, TCP): ALLOW, (80, TCP): DENY}),
    (["allow github.com 80/tcp"], {(443, TCP): DENY, (80, TCP): ALLOW}),
    (["allow *.github.com"], {(443, TCP): DENY, (80, TCP): DENY}),
    (["allow github.com", "deny 140.82.0.0/16"], {(443, TCP): DENY, (80, TCP): DENY}),
    ([], {(443, TCP): DENY, (80, TCP): DENY}),
])
def test_dns_entries_follow_their_hostname_through_a_reload(new_rules, expected):
    fw, maps = firewall("allow github.com 443/tcp")
    fw.add_ip("140.82.112.3", "allow", specs("443/tcp"), hostname="github.com")
    fw.program(make_policy(*new_rules), audit_mode=False)
    for (port, proto), action in expected.items():
        assert maps.verdict("140.82.112.3", port, proto) == action


@pytest.mark.parametrize("new_rules, expected", [
    ([], ALLOW),
    (["deny 192.0.2.0/24"], DENY),
    (["deny 192.0.2.0/24 22/tcp"], ALLOW),
])
def test_entries_without_hostname_survive_unless_a_cidr_now_denies(new_rules, expected):
    fw, maps = firewall()
    fw.add_ip("192.0.2.7", "allow", specs("443/tcp"))
    fw.program(make_policy(*new_rules), audit_mode=False)
    assert maps.verdict("192.0.2.7", 443, TCP) == expected


def test_a_restarted_writer_adopts_host_entries_and_drops_stale_subnets():
    maps = DictRuleMaps()
    before = Firewall(maps)
    before.program(make_policy("allow 10.0.0.0/8"), audit_mode=False)
    before.add_ip("192.0.2.7", "allow", specs("443/tcp 53/udp"), hostname="a.example")
    before.add_ip("192.0.2.8", "deny", ())
    after = Firewall(maps)
    after.program(make_policy(), audit_mode=False)
    assert maps.verdict("192.0.2.7", 443, TCP) == ALLOW
    assert maps.verdict("192.0.2.7", 53, UDP) == ALLOW
    assert maps.get_cidr(net("192.0.2.8/32")) == (DENY, False)
    assert net("10.0.0.0/8") not in maps.cidr_entries


PROBE_IPS = ["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.3.1", "10.2.0.1", "11.0.0.1"]
PROBE_PORTS = [(443, TCP), (80, TCP), (22, TCP), (443, UDP), (0, ICMP)]
PROBES = [(ip, port, proto) for ip in PROBE_IPS for port, proto in PROBE_PORTS]


def assert_reload_never_denies_what_both_allow(old, new, grants=()):
    fw, maps = firewall(*old["rules"], default=old["default"])
    for ip, action, ports in grants:
        fw.add_ip(ip, action, specs(ports))
    before = {probe: maps.verdict(*probe) for probe in PROBES}
    steps = []
    maps.after_each = lambda op: steps.append(
        (op, {probe: maps.verdict(*probe) for probe in PROBES}))
    fw.program(make_policy(*new["rules"], default=new["default"]), audit_mode=False)
    after = steps[-1][1] if steps else before
    both = [p for p in PROBES if before[p] == ALLOW and after[p] == ALLOW]
    for operation, verdicts in steps:
        denied = [p for p in both if verdicts[p] != ALLOW]
        assert not denied, f"after {operation}: {denied} denied"


RELOADS = [
    ({"default": "deny", "rules": ["allow 10.0.0.0/8"]},
     {"default": "deny", "rules": ["deny 10.0.0.0/8", "allow 10.1.0.0/16"]}),
    ({"default": "deny", "rules": ["deny 10.1.0.0/16", "allow 10.1.2.0/24"]},
     {"default": "deny", "rules": ["allow 10.0.0.0/8"]}),
    ({"default": "deny", "rules": ["allow 10.0.0.0/8 443/tcp"]},
     {"default": "deny", "rules": ["allow 10.0.0.0/8 443/tcp 80/tcp"]}),
    ({"default": "deny", "rules": ["allow 10.1.2.3"]},
     {"default": "deny", "rules": ["allow 10.1.2.3 443/tcp"]}),
    ({"default": "deny", "rules": ["allow 10.1.2.3 443/tcp"]},
     {"default": "deny", "rules": ["allow 10.0.0.0/8"]}),
    ({"default": "deny", "rules": ["allow 10.0.0.0/8 443/tcp"]},
     {"default": "deny", "rules": ["deny 10.0.0.0/8 443/tcp", "allow 10.1.2.3"]}),
    ({"default": "allow", "rules": []}, {"default": "deny", "rules": ["allow 10.0.0.0/8"]}),
    ({"default": "deny", "rules": ["allow 10.0.0.0/8"]}, {"default": "allow", "rules": []}),
    ({"default": "deny", "rules": ["allow 0.0.0.0/0 443/tcp"]},
     {"default": "deny", "rules": ["allow 10.0.0.0/8 443/tcp", "deny 0.0.0.0/0 443/tcp"]}),
]


@pytest.mark.parametrize("old, new", RELOADS)
def test_reload_never_denies_a_connection_both_policies_allow(old, new):
    assert_reload_never_denies_what_both_allow(old, new, [("10.1.2.5", "allow", "443/tcp")])


NETWORKS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "10.1.2.4"]
PORT_LISTS = ["", "", "443/tcp", "80/tcp", "443/all", "22/tcp 443/tcp"]


def random_policy(rng):
    rules = [" ".join([rng.choice(["allow", "deny"]), rng.choice(NETWORKS),
                       rng.choice(PORT_LISTS)]) for _ in range(rng.randint(0, 5))]
    return {"default": rng.choice(["allow", "deny"]), "rules": rules}


@pytest.mark.parametrize("seed", range(40))
def test_random_reloads_never_deny_what_both_policies_allow(seed):
    rng = random.Random(seed)
    for _ in range(25):
        grants = [(rng.choice(PROBE_IPS), rng.choice(["allow", "deny"]), rng.choice(PORT_LISTS))
                  for _ in range(rng.randint(0, 3))]
        assert_reload_never_denies_what_both_allow(random_policy(rng), random_policy(rng), grants)
