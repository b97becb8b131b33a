"""The one writer of the firewall maps (reference §4), over a RuleMaps adapter.

The policy stage owns a Firewall. Static rules come from a Policy; the DNS path, late-allow
and the start-up scan of existing connections add addresses at run time with add_ip, and the
per-address accumulator remembers each request (a Grant) so that a reload can carry them over.

program() moves the maps to a new policy by diff, in an order chosen so that a connection
both policies allow is never denied in between: entries that allow are written first, stale
entries are deleted last (denies before allows, most specific first), and the default
action and audit flag relax before the entries change and tighten after. Runtime grants
survive a reload when the new policy still justifies them: a hostname's grants are re-derived
from its new verdict (and vanish when it no longer matches); grants without a hostname
(existing connections, entries adopted from pinned maps after a restart) stay unless a CIDR
rule of the new policy now denies them.

Not thread safe: the policy stage's loop is the only caller.
"""

from __future__ import annotations

import logging
from typing import Mapping, Protocol, Sequence

from .policy.existing import ExistingConnection
from .policy.mapstate import (ACTION_CODES, CidrValue, Grant, MapState, PortEntry,
                              adopted_grants, desired_state, host_network, rejudge)
from .policy.model import Policy
from .policy.verdict import PortSpec
from .rulemaps import ALLOW, DENY, Network, RuleMaps

log = logging.getLogger("policy")


class FirewallUpdater(Protocol):
    """What late-allow needs (the seed's FirewallUpdater): open an address for ports."""

    def add_ip(self, ip: str, action: str, ports: Sequence[PortSpec]) -> bool: ...


class Firewall:
    def __init__(self, maps: RuleMaps) -> None:
        self.maps = maps
        # What the maps hold, so diffs and add_ip never read the kernel back.
        self.cidrs: dict[Network, CidrValue] = {n: (a, ps) for n, a, ps in maps.cidrs()}
        self.ports: dict[PortEntry, int] = {(n, p, pr): a for n, p, pr, a in maps.ports()}
        self.runtime: dict[Network, list[Grant]] = adopted_grants(self.cidrs, self.ports)
        self.policy = Policy()
        self.state = desired_state(self.policy, self.runtime)

    # ------------------------------------------------------------ switches

    def set_default_action(self, action: str) -> None:
        _, audit_mode, generation = self.maps.get_config()
        self.maps.set_config(ACTION_CODES[action], audit_mode, generation)

    def set_audit_mode(self, audit_mode: bool) -> None:
        default_action, _, generation = self.maps.get_config()
        self.maps.set_config(default_action, audit_mode, generation)

    def mark_programmed(self) -> int:
        """Bump the generation: capture attaches the classifier once it is non-zero, so call
        this after the policy, the auto-allows and the existing connections are written."""
        default_action, audit_mode, generation = self.maps.get_config()
        generation = generation % 0xFFFFFFFF + 1  # a u32 in the kernel, never 0 again
        self.maps.set_config(default_action, audit_mode, generation)
        return generation

    # ------------------------------------------------------------ per address

    def add_ip(self, ip: str, action: str, ports: Sequence[PortSpec], hostname: str = "") -> bool:
        """Open (or close) one address for ports (empty = all); True when the maps changed.
        hostname names the rule's subject (the queried name, or a CNAME chain's origin), so a
        reload can re-judge the entry; leave it empty for existing connections."""
        network = host_network(ip)
        grant = Grant(action, tuple(ports), hostname)
        folded = self.state.grant(network, grant)
        if folded is None:
            return False
        state, ports_changed = folded
        if grant.ports and not state.lpm[1] and state.lpm[0] != ACTION_CODES[action]:
            log.warning("%s already has an all-ports %s; %s for %s not written", ip,
                        "deny" if state.all_deny else "allow", action, list(ports))
        grants = self.runtime.setdefault(network, [])
        if grant not in grants:
            grants.append(grant)
        for (port, proto), code in state.ports.items():
            self._put_port((network, port, proto), code)
        return self._put_cidr(network, state.lpm) or ports_changed

    def remove_ip(self, ip: str) -> None:
        network = host_network(ip)
        self.runtime.pop(network, None)
        self.state.networks.pop(network, None)
        if network in self.cidrs:
            self.maps.delete_cidr(network)
            del self.cidrs[network]
        for entry in [e for e in self.ports if e[0] == network]:
            self.maps.delete_port(*entry)
            del self.ports[entry]

    # ------------------------------------------------------------ whole policy

    def sync(self, policy: Policy) -> None:
        """Write what policy needs, keeping every entry already there (add-only)."""
        self.policy = policy
        self.state = desired_state(policy, self.runtime)
        self._write(self.state.cidr_entries(), self.state.port_entries())

    def program(self, policy: Policy, audit_mode: bool) -> None:
        """Move the maps from what they hold to what policy needs, by diff (see module doc)."""
        runtime = {network: kept for network, grants in self.runtime.items()
                   if (kept := rejudge(policy, network, grants))}
        state = desired_state(policy, runtime)
        final_config = ACTION_CODES[policy.default_action], audit_mode
        old_default, old_audit, generation = self.maps.get_config()
        relaxed_default = ALLOW if ALLOW in (old_default, final_config[0]) else DENY
        self._set_config(relaxed_default, old_audit or audit_mode, generation)
        cidrs, ports = state.cidr_entries(), state.port_entries()
        self._write(cidrs, ports)
        self._delete_stale(cidrs, ports)
        self._set_config(*final_config, generation)
        self.policy, self.runtime, self.state = policy, runtime, state

    # ------------------------------------------------------------ map operations

    def _set_config(self, default_action: int, audit_mode: bool, generation: int) -> None:
        if self.maps.get_config() != (default_action, audit_mode, generation):
            self.maps.set_config(default_action, audit_mode, generation)

    def _write(self, cidrs: Mapping[Network, CidrValue], ports: Mapping[PortEntry, int]) -> None:
        """Allows first; a port-specific LPM entry once its port entries are in; denies last."""
        new_ports = {e: a for e, a in ports.items() if self.ports.get(e) != a}
        new_cidrs = {n: v for n, v in cidrs.items() if self.cidrs.get(n) != v}
        for entry in [e for e, a in new_ports.items() if a == ALLOW]:
            self._put_port(entry, ALLOW)
        for network in sorted(new_cidrs, key=lambda n: _write_order(new_cidrs[n])):
            self._put_cidr(network, new_cidrs[network])
        for entry in [e for e, a in new_ports.items() if a == DENY]:
            self._put_port(entry, DENY)

    def _delete_stale(self, cidrs: Mapping[Network, CidrValue],
                      ports: Mapping[PortEntry, int]) -> None:
        """Stale denies go first; stale allows most specific first, so each lookup falls back
        to a broader entry that is already in its final state."""
        stale_cidrs = [n for n in self.cidrs if n not in cidrs]
        for network in sorted(stale_cidrs, key=lambda n: (self.cidrs[n] != (DENY, False),
                                                          -n.prefixlen)):
            self.maps.delete_cidr(network)
            del self.cidrs[network]
        stale_ports = [e for e in self.ports if e not in ports]
        for entry in sorted(stale_ports, key=lambda e: (self.ports[e] != DENY, -e[0].prefixlen)):
            self.maps.delete_port(*entry)
            del self.ports[entry]

    def _put_cidr(self, network: Network, value: CidrValue) -> bool:
        if self.cidrs.get(network) == value:
            return False
        self.maps.put_cidr(network, *value)
        self.cidrs[network] = value
        return True

    def _put_port(self, entry: PortEntry, action: int) -> None:
        if self.ports.get(entry) != action:
            self.maps.put_port(*entry, action)
            self.ports[entry] = action


def _write_order(value: CidrValue) -> int:
    """All-ports allows first, then port-specific entries, all-ports denies last."""
    action, port_specific = value
    return 1 if port_specific else 0 if action == ALLOW else 2


def apply_existing_connection(updater: FirewallUpdater, plan: ExistingConnection) -> bool:
    """Perform an existing connection's writes; True when its record should be logged (it
    is blocked, or the last write changed the maps)."""
    changed = not plan.allowed
    for action, ports in plan.writes:
        changed = updater.add_ip(plan.dst_ip, action, ports)
    return changed
