"""Rules sluice adds itself, and the tags that say so (reference §3.9, §6.2).

Each helper returns a new Policy with the rules appended (a Policy never changes), so the
policy stage re-applies its auto-allows after every reload.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

from .cidrs import parse_address
from .hostnames import hostname_problem
from .model import Policy
from .ports import ports_cover, ports_cover_all
from .rules import Rule
from .searchdomains import normalize_search_domains, search_domain_problem
from .verdict import PortSpec

log = logging.getLogger("policy")

DNS_PORTS = (PortSpec(53, "udp"),)
CLOUD_METADATA_ADDRESS = "169.254.169.254"
AZURE_WIRE_SERVER = "168.63.129.16"
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
AZURE_INFRA_PORTS = (PortSpec(53, "udp"), PortSpec(80, "tcp"), PortSpec(32526, "tcp"),
                     PortSpec(0, "icmp"))
AZURE_INFRA_HOSTS = ("trafficmanager.net", "blob.core.windows.net")
CLOUD_SEARCH_DOMAINS = {
    "aws": (".compute.internal", ".ec2.internal"),
    "gcp": (".google.internal",),
    "azure": (".internal.cloudapp.net",),
}
LOCAL_RESOLVERS = ("127.0.0.1", "127.0.0.53")


def ensure_infra_allowed(policy: Policy, addresses: Iterable[str], ports: Sequence[PortSpec],
                         auto_type: str) -> Policy:
    """Allow each address or CIDR on ports unless a CIDR deny vetoes it or a CIDR rule
    already covers it; unparseable entries are skipped with a warning."""
    added: list[Rule] = []
    for entry in (a.strip() for a in addresses):
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            log.warning("auto-allow (%s): %r is not an address or CIDR, skipped", auto_type, entry)
            continue
        broader = [r for r in (*policy.cidrs.rules, *added) if _covers(r, network)]
        if any(_vetoes(r, ports) for r in broader if r.action == "deny"):
            continue
        if any(_already_allows(r, ports) for r in broader):
            continue
        added.append(Rule("cidr", str(network), "allow", tuple(ports), auto_type))
    return policy.with_rules(added)


def _covers(rule: Rule, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    rule_network = rule.network
    if isinstance(network, ipaddress.IPv4Network):
        return isinstance(rule_network, ipaddress.IPv4Network) and network.subnet_of(rule_network)
    return isinstance(rule_network, ipaddress.IPv6Network) and network.subnet_of(rule_network)


def _vetoes(deny: Rule, ports: Sequence[PortSpec]) -> bool:
    """An all-ports deny vetoes everything; a port-limited one only a request it fully names."""
    return not deny.ports or (bool(ports) and ports_cover_all(deny.ports, ports))


def _already_allows(rule: Rule, ports: Sequence[PortSpec]) -> bool:
    if not ports:
        return rule.action == "allow" and not rule.ports
    return ports_cover_all(rule.ports, ports)


def ensure_dns_allowed(policy: Policy, addresses: Iterable[str]) -> Policy:
    """The resolvers sluice forwards to (and loopback), 53/udp, tagged `dns`."""
    return ensure_infra_allowed(policy, addresses, DNS_PORTS, "dns")


def ensure_hostname_allowed(policy: Policy, hostname: str, ports: Sequence[PortSpec],
                            auto_type: str) -> Policy:
    """Allow a literal hostname (never a glob) unless a rule already allows it by name."""
    name = hostname.strip().lower()
    problem = hostname_problem(name) or ("a glob" if "*" in name else None)
    if problem:
        log.warning("auto-allow (%s): hostname %r skipped: %s", auto_type, hostname, problem)
        return policy
    if policy.tracked_hostnames.get(name) == "allow":
        return policy
    return policy.with_rules([Rule("hostname", name, "allow", tuple(ports), auto_type)])


def add_search_domains(policy: Policy, domains: Iterable[str]) -> Policy:
    """Search domains sluice adds itself: bad ones are skipped with a warning."""
    good = []
    for domain in normalize_search_domains(domains):
        problem = search_domain_problem(domain)
        if problem:
            log.warning("auto search domain skipped: %s", problem)
        else:
            good.append(domain)
    return policy.with_rules(search_domains=good)


def get_auto_allowed_type(policy: Policy, ip: str, port: int, protocol: str,
                          hostname: str = "") -> str:
    """The tag of the auto-added allow rule covering this connection, or "". Hostname rules
    are asked first; protocol is tcp, udp, icmp or all (unknown)."""
    name = hostname.lower()
    for rule in policy.auto_rules:
        if (rule.type == "hostname" and name and ports_cover(rule.ports, port, protocol)
                and policy.hostnames.rule_matches(rule, name)):
            return rule.auto_added_type
    addr = parse_address(ip) if ip else None
    for rule in policy.auto_rules:
        if (rule.type == "cidr" and addr is not None and addr in rule.network
                and ports_cover(rule.ports, port, protocol)):
            return rule.auto_added_type
    return ""


def get_auto_allowed_type_for_hostname(policy: Policy, hostname: str) -> str:
    """The tag of an auto-added hostname allow rule matching hostname, ports ignored."""
    name = hostname.lower()
    for rule in policy.auto_rules:
        if rule.type == "hostname" and name and policy.hostnames.rule_matches(rule, name):
            return rule.auto_added_type
    return ""


# ------------------------------------------------------------------ cloud metadata


def resolvers_from_resolv_conf(text: str) -> list[str]:
    """The upstream resolvers of a resolv.conf (systemd-resolved's), local stubs excluded."""
    resolvers = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and fields[1] not in LOCAL_RESOLVERS:
            resolvers.append(fields[1])
    return resolvers


def detect_cloud_provider(sys_vendor: str, chassis_asset_tag: str, resolvers: Sequence[str],
                          override: str = "") -> str:
    """aws, azure, gcp or "" from an explicit override, DMI strings and the resolvers."""
    if override.strip().lower() in CLOUD_SEARCH_DOMAINS:
        return override.strip().lower()
    if "Amazon EC2" in sys_vendor:
        return "aws"
    if "Google" in sys_vendor:
        return "gcp"
    if chassis_asset_tag.strip() == AZURE_ASSET_TAG or AZURE_WIRE_SERVER in resolvers:
        return "azure"
    return ""


def cloud_metadata_allows(policy: Policy, resolv_conf: str, sys_vendor: str = "",
                          chassis_asset_tag: str = "", override: str = "") -> Policy:
    """SLUICE_AUTO_ALLOW_CLOUD_METADATA: the cloud's resolvers, the metadata service and the
    detected provider's infrastructure; inputs are the files' text, read by the caller."""
    resolvers = resolvers_from_resolv_conf(resolv_conf)
    policy = ensure_dns_allowed(policy, resolvers)
    policy = ensure_infra_allowed(policy, [CLOUD_METADATA_ADDRESS], [PortSpec(80, "tcp")],
                                  "cloud_metadata")
    provider = detect_cloud_provider(sys_vendor, chassis_asset_tag, resolvers, override)
    if provider == "azure":
        policy = ensure_infra_allowed(policy, [AZURE_WIRE_SERVER], AZURE_INFRA_PORTS,
                                      "azure_infrastructure")
        for host in AZURE_INFRA_HOSTS:
            policy = ensure_hostname_allowed(policy, host, [PortSpec(443, "tcp")],
                                             "azure_infrastructure")
    return add_search_domains(policy, CLOUD_SEARCH_DOMAINS.get(provider, ()))
