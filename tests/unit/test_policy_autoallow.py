"""Auto-allow helpers, their tags and the cloud-metadata inputs (reference §3.9, §6.2)."""

import pytest

from pipeline.policy import autoallow
from pipeline.policy.rules import Rule
from pipeline.policy.verdict import PortSpec
from tests.support.policykit import make_policy, specs

INFRA = [
    ([], ["10.1.2.3"], "53/udp", ["10.1.2.3/32"]),
    ([], ["", " ", "not-an-ip", "10.1.2.3"], "53/udp", ["10.1.2.3/32"]),
    ([], ["10.1.2.3", "10.1.2.3"], "53/udp", ["10.1.2.3/32"]),
    ([], ["10.1.2.3/24", "2001:db8::1"], "", ["10.1.2.0/24", "2001:db8::1/128"]),
    (["deny 10.0.0.0/8"], ["10.1.2.3"], "53/udp", []),
    (["deny 10.1.2.3"], ["10.1.2.0/24"], "53/udp", ["10.1.2.0/24"]),
    (["deny ::/0"], ["10.1.2.3"], "53/udp", ["10.1.2.3/32"]),
    (["deny 10.0.0.0/8 53/udp"], ["10.1.2.3"], "53/udp", []),
    (["deny 10.0.0.0/8 53/all"], ["10.1.2.3"], "53/udp", []),
    (["deny 10.0.0.0/8 53/udp"], ["10.1.2.3"], "53/udp 80/tcp", ["10.1.2.3/32"]),
    (["deny 10.0.0.0/8 53/udp"], ["10.1.2.3"], "", ["10.1.2.3/32"]),
    (["allow 10.0.0.0/8"], ["10.1.2.3"], "", []),
    (["allow 10.0.0.0/8 443/tcp"], ["10.1.2.3"], "", ["10.1.2.3/32"]),
    (["allow 10.0.0.0/8"], ["10.1.2.3"], "53/udp", []),
    (["allow 10.0.0.0/8 53/all"], ["10.1.2.3"], "53/udp", []),
    (["allow 10.0.0.0/8 53/tcp"], ["10.1.2.3"], "53/udp", ["10.1.2.3/32"]),
    (["allow 10.1.2.3"], ["10.1.2.0/24"], "53/udp", ["10.1.2.0/24"]),
    (["allow 10.0.0.0/8 53/udp", "allow 10.1.0.0/16 80/tcp"], ["10.1.2.3"], "53/udp 80/tcp",
     ["10.1.2.3/32"]),
]


@pytest.mark.parametrize("rules, addresses, ports, added", INFRA)
def test_ensure_infra_allowed(rules, addresses, ports, added):
    policy = make_policy(*rules)
    after = autoallow.ensure_infra_allowed(policy, addresses, specs(ports), "dns")
    new = after.rules[len(policy.rules):]
    assert new == tuple(Rule("cidr", value, "allow", specs(ports), "dns") for value in added)


def test_ensure_dns_allowed_is_53_udp_tagged_dns():
    policy = autoallow.ensure_dns_allowed(make_policy(), ["127.0.0.1", "192.0.2.53"])
    assert [(r.value, r.ports, r.auto_added_type) for r in policy.rules] == [
        ("127.0.0.1/32", (PortSpec(53, "udp"),), "dns"),
        ("192.0.2.53/32", (PortSpec(53, "udp"),), "dns")]


@pytest.mark.parametrize("rules, name, added", [
    ([], "GitHub.com", "github.com"),
    (["allow github.com 443/tcp"], "github.com", None),
    (["deny github.com"], "github.com", "github.com"),
    (["allow *.github.com"], "api.github.com", "api.github.com"),
    ([], "*.github.com", None),
    ([], "bad..name", None),
])
def test_ensure_hostname_allowed(rules, name, added):
    policy = make_policy(*rules)
    after = autoallow.ensure_hostname_allowed(policy, name, specs("443/tcp"), "github_service")
    new = after.rules[len(policy.rules):]
    expected = () if added is None else (
        Rule("hostname", added, "allow", specs("443/tcp"), "github_service"),)
    assert new == expected


def tagged(*rules):
    policy = make_policy()
    for kind, value, action, ports, auto_type in rules:
        policy = policy.with_rules([Rule(kind, value, action, specs(ports), auto_type)])
    return policy


TAGS = [
    ([("cidr", "10.1.2.3/32", "allow", "53/udp", "dns")], ("10.1.2.3", 53, "udp", ""), "dns"),
    ([("cidr", "10.1.2.3/32", "allow", "53/udp", "dns")], ("10.1.2.3", 53, "tcp", ""), ""),
    ([("cidr", "10.1.2.3/32", "allow", "53/udp", "dns")], ("10.1.2.3", 53, "all", ""), "dns"),
    ([("cidr", "10.1.2.3/32", "allow", "53/udp", "dns")], ("10.1.2.4", 53, "udp", ""), ""),
    ([("cidr", "10.0.0.0/8", "allow", "", "loopback")], ("10.9.9.9", 1, "icmp", ""), "loopback"),
    ([("cidr", "10.0.0.0/8", "deny", "", "dns")], ("10.9.9.9", 53, "udp", ""), ""),
    ([("cidr", "10.0.0.0/8", "allow", "", "")], ("10.9.9.9", 53, "udp", ""), ""),
    ([("hostname", "github.com", "allow", "443/tcp", "github_service")],
     ("1.2.3.4", 443, "tcp", "api.github.com"), "github_service"),
    ([("hostname", "github.com", "allow", "443/tcp", "github_service")],
     ("1.2.3.4", 443, "tcp", "GitHub.com"), "github_service"),
    ([("hostname", "github.com", "allow", "443/tcp", "github_service")],
     ("1.2.3.4", 22, "tcp", "github.com"), ""),
    ([("hostname", "*.blob.core.windows.net", "allow", "", "azure_infrastructure")],
     ("1.2.3.4", 443, "tcp", "x.blob.core.windows.net"), "azure_infrastructure"),
    ([("cidr", "1.2.3.0/24", "allow", "", "dns"),
      ("hostname", "github.com", "allow", "", "github_service")],
     ("1.2.3.4", 443, "tcp", "github.com"), "github_service"),
    ([("cidr", "1.2.3.0/24", "allow", "", "dns"),
      ("hostname", "github.com", "allow", "", "github_service")],
     ("1.2.3.4", 443, "tcp", "example.com"), "dns"),
]


@pytest.mark.parametrize("rules, connection, expected", TAGS)
def test_get_auto_allowed_type(rules, connection, expected):
    assert autoallow.get_auto_allowed_type(tagged(*rules), *connection) == expected


@pytest.mark.parametrize("hostname, expected", [
    ("github.com", "github_service"), ("api.github.com", "github_service"),
    ("example.com", ""), ("", ""), ("x.trafficmanager.net", "azure_infrastructure"),
])
def test_get_auto_allowed_type_for_hostname_ignores_ports(hostname, expected):
    policy = tagged(("hostname", "github.com", "allow", "443/tcp", "github_service"),
                    ("hostname", "trafficmanager.net", "allow", "443/tcp", "azure_infrastructure"),
                    ("hostname", "example.com", "deny", "", "dns"))
    assert autoallow.get_auto_allowed_type_for_hostname(policy, hostname) == expected


RESOLV_CONF = """# systemd-resolved
nameserver 127.0.0.53
nameserver 10.0.0.2
nameserver 127.0.0.1
options edns0
nameserver 168.63.129.16
"""


def test_resolvers_from_resolv_conf_skip_local_stubs():
    assert autoallow.resolvers_from_resolv_conf(RESOLV_CONF) == ["10.0.0.2", "168.63.129.16"]


@pytest.mark.parametrize("vendor, tag, resolvers, override, provider", [
    ("Amazon EC2", "", [], "", "aws"),
    ("Google", "", [], "", "gcp"),
    ("Microsoft Corporation", "7783-7084-3265-9085-8269-3286-77", [], "", "azure"),
    ("", "", ["168.63.129.16"], "", "azure"),
    ("QEMU", "", ["10.0.0.2"], "", ""),
    ("Amazon EC2", "", [], "GCP", "gcp"),
    ("", "", [], "other", ""),
])
def test_detect_cloud_provider(vendor, tag, resolvers, override, provider):
    assert autoallow.detect_cloud_provider(vendor, tag, resolvers, override) == provider


@pytest.mark.parametrize("vendor, rules, domains", [
    ("Amazon EC2",
     [("10.0.0.2/32", "53/udp", "dns"), ("169.254.169.254/32", "80/tcp", "cloud_metadata")],
     (".compute.internal", ".ec2.internal")),
    ("Google",
     [("10.0.0.2/32", "53/udp", "dns"), ("169.254.169.254/32", "80/tcp", "cloud_metadata")],
     (".google.internal",)),
])
def test_cloud_metadata_allows(vendor, rules, domains):
    policy = autoallow.cloud_metadata_allows(make_policy(), "nameserver 10.0.0.2\n", vendor)
    assert [(r.value, r.ports, r.auto_added_type) for r in policy.rules] == [
        (value, specs(ports), auto) for value, ports, auto in rules]
    assert policy.search_domains == domains


def test_cloud_metadata_on_azure_opens_the_wire_server_and_infra_hosts():
    policy = autoallow.cloud_metadata_allows(make_policy(), RESOLV_CONF)
    assert [(r.value, r.ports, r.auto_added_type) for r in policy.rules] == [
        ("10.0.0.2/32", specs("53/udp"), "dns"),
        ("168.63.129.16/32", specs("53/udp"), "dns"),
        ("169.254.169.254/32", specs("80/tcp"), "cloud_metadata"),
        ("168.63.129.16/32", specs("53/udp 80/tcp 32526/tcp 0/icmp"), "azure_infrastructure"),
        ("trafficmanager.net", specs("443/tcp"), "azure_infrastructure"),
        ("blob.core.windows.net", specs("443/tcp"), "azure_infrastructure"),
    ]
    assert policy.search_domains == (".internal.cloudapp.net",)


def test_auto_search_domains_skip_bad_entries():
    policy = autoallow.add_search_domains(make_policy(), ["co.uk", "corp.example.com", ""])
    assert policy.search_domains == (".corp.example.com",)
