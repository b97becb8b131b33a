"""What the firewall maps should hold for a policy plus runtime grants (reference §4), as data.

Every network with an LPM entry (a subnet rule, a host rule, an address the DNS path or
late-allow opened) is folded from its grants, in order, by the per-IP accumulator of
reference §4.4: all-ports grants are sticky, an all-ports deny beats an all-ports allow, and
(a sluice deviation, so the kernel agrees with the late-allow prediction) a port entry once
denied is not reopened by a later allow. `0.0.0.0/0` and `::/0` rules with ports become
wildcard port entries only. The firewall writer diffs two MapStates; explain reads one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from ..rulemaps import ALLOW, DENY, Network
from .cidrs import parse_address
from .model import Policy
from .ports import IPPROTO_ICMP, PROTOCOL_NAMES, PortKey, expand_ports, without_denied
from .verdict import HostnameVerdict, PortSpec

ACTION_CODES = {"allow": ALLOW, "deny": DENY}
ACTION_NAMES = {ALLOW: "allow", DENY: "deny"}

CidrValue = tuple[int, bool]               # (action, port_specific)
PortEntry = tuple[Network, int, int]        # (network, port, protocol number)


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """One add_ip request: what to write for an address, and the hostname whose rule asked
    for it ("" for CIDR rules, existing connections and entries adopted after a restart)."""

    action: str
    ports: tuple[PortSpec, ...] = ()
    hostname: str = ""


def map_keys(network: Network, ports: Sequence[PortSpec]) -> list[PortKey] | None:
    """The port entries of a port list for this network; None when the list was non-empty but
    leaves nothing (only ICMP on IPv6, which always passes), so there is nothing to write."""
    keys = expand_ports(ports)
    if ports and not keys:
        raise ValueError(f"no protocol this firewall knows in {list(ports)}")
    if network.version == 6:
        keys = [key for key in keys if key[1] != IPPROTO_ICMP]
        if ports and not keys:
            return None
    return keys


class NetworkState:
    """The accumulator of one network: sticky all-ports flags and the port entries."""

    def __init__(self) -> None:
        self.all_allow = False
        self.all_deny = False
        self.ports: dict[PortKey, int] = {}
        self.last_action = DENY

    def apply(self, action: int, keys: Sequence[PortKey]) -> bool:
        """Fold one grant in; True when a port entry is new or changed its action."""
        self.last_action = action
        if not keys:
            self.all_allow |= action == ALLOW
            self.all_deny |= action == DENY
            return False
        if self.all_allow or self.all_deny:
            return False
        changed = False
        for key in keys:
            old = self.ports.get(key)
            if old == DENY:
                continue
            changed |= old != action
            self.ports[key] = action
        return changed

    @property
    def lpm(self) -> CidrValue:
        if self.all_deny:
            return DENY, False
        if self.all_allow:
            return ALLOW, False
        return self.last_action, True


@dataclasses.dataclass
class MapState:
    networks: dict[Network, NetworkState] = dataclasses.field(default_factory=dict)
    wildcards: dict[Network, NetworkState] = dataclasses.field(default_factory=dict)

    def grant(self, network: Network, grant: Grant) -> tuple[NetworkState, bool] | None:
        """Fold a grant into its network; (state, ports changed), or None if nothing to write."""
        keys = map_keys(network, grant.ports)
        if keys is None:
            return None
        wildcard = network.prefixlen == 0 and bool(keys)
        states = self.wildcards if wildcard else self.networks
        state = states.setdefault(network, NetworkState())
        return state, state.apply(ACTION_CODES[grant.action], keys)

    def cidr_entries(self) -> dict[Network, CidrValue]:
        return {network: state.lpm for network, state in self.networks.items()}

    def port_entries(self) -> dict[PortEntry, int]:
        return {(network, port, proto): action
                for states in (self.networks, self.wildcards)
                for network, state in states.items()
                for (port, proto), action in state.ports.items()}


def desired_state(policy: Policy, runtime: Mapping[Network, Iterable[Grant]]) -> MapState:
    """The maps for policy's CIDR rules (in order), then each address's runtime grants."""
    state = MapState()
    for rule in policy.cidrs.rules:
        state.grant(rule.network, Grant(rule.action, rule.ports))
    for network, grants in runtime.items():
        for grant in grants:
            state.grant(network, grant)
    return state


def side_grants(policy: Policy, ip: str, verdict: HostnameVerdict,
                hostname: str) -> list[Grant]:
    """What the DNS path writes for one answer address (reference §5.4 apply_side): the deny
    side first, then the allow side, each after the CIDR conflict check, and nothing where
    the outcome equals the default action."""
    grants = []
    allow_rule, allow_ports = verdict.allow_rule, verdict.allow_ports
    if verdict.has_deny and verdict.has_allow:
        left = without_denied(allow_ports, verdict.deny_ports)
        if left is None:
            allow_rule = ""  # nothing the deny side leaves open
        else:
            allow_ports = left
    for action, rule, ports in (("deny", verdict.deny_rule, verdict.deny_ports),
                                ("allow", allow_rule, allow_ports)):
        final = policy.ip_write_action(ip, action, ports) if rule else None
        if final is not None:
            grants.append(Grant(final, ports, hostname))
    return grants


def rejudge(policy: Policy, network: Network, grants: Iterable[Grant]) -> list[Grant]:
    """An address's runtime grants under a new policy: a hostname's grants are re-derived from
    its new verdict (gone when it no longer matches); others stay unless a CIDR rule now
    denies what they allow."""
    ip = str(network.network_address)
    kept: dict[Grant, None] = {}
    for hostname in dict.fromkeys(g.hostname for g in grants if g.hostname):
        kept.update(dict.fromkeys(side_grants(policy, ip, policy.match_hostname(hostname),
                                              hostname)))
    for grant in grants:
        if not grant.hostname and not (
                grant.action == "allow"
                and policy.check_ip_rule_conflict(ip, "allow", grant.ports).conflict):
            kept[grant] = None
    return list(kept)


def adopted_grants(cidrs: Mapping[Network, CidrValue],
                   ports: Mapping[PortEntry, int]) -> dict[Network, list[Grant]]:
    """Host entries found in the maps at start (a restarted stage): grants that reproduce
    them, so connections they carry survive until a policy says otherwise."""
    by_host: dict[Network, dict[int, list[PortSpec]]] = {}
    for (network, port, proto), action in ports.items():
        if network.prefixlen == network.max_prefixlen and proto in PROTOCOL_NAMES:
            by_host.setdefault(network, {}).setdefault(action, []).append(
                PortSpec(port, PROTOCOL_NAMES[proto]))
    adopted = {}
    for network, (action, port_specific) in cidrs.items():
        if network.prefixlen != network.max_prefixlen:
            continue
        if not port_specific:
            adopted[network] = [Grant(ACTION_NAMES[action])]
        elif network in by_host:
            entries = by_host[network]
            adopted[network] = [Grant(ACTION_NAMES[code], tuple(entries[code]))
                                for code in (DENY, ALLOW) if code in entries]
    return adopted


def host_network(ip: str) -> Network:
    return ipaddress.ip_network(parse_address(ip))
