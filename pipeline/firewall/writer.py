"""The one writer of the firewall maps (reference §4), over a RuleMaps adapter.

The policy stage owns a Firewall. Static rules come from a Policy; the DNS path, late-allow
and the start-up scan of existing connections add addresses at run time with add_ip, and the
per-address accumulator remembers each request (a Grant) so that a reload can carry them over.

program() moves the maps to a new policy by diff, in an order chosen (policy/mapdiff.py) so
that a connection both policies allow is never denied in between. Runtime grants
survive a reload when the new policy still justifies them: a hostname's grants are re-derived
from its new verdict (and vanish when it no longer matches); grants without a hostname
(existing connections, entries adopted from pinned maps after a restart) stay unless a CIDR
rule of the new policy now denies them.

Not thread safe: the policy stage's loop is the only caller.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from ..policy.existing import ExistingConnection
from ..policy.mapdiff import plan_move
from ..policy.mapstate import (ACTION_CODES, CidrValue, Grant, PortEntry, adopted_grants,
                              desired_state, host_network, rejudge)
from ..policy.model import Policy
from ..policy.verdict import PortSpec
from ..rulemaps import ALLOW, DENY, Network, RuleMaps

log = logging.getLogger("policy")


class FirewallUpdater(Protocol):
    """The seed's FirewallUpdater: open (or close) an address for ports, for the hostname
    whose rule asked. Late-allow, the DNS path (opening.py) and the start-up scan of existing
    connections write through it; Firewall is the implementation."""

    def add_ip(self, ip: str, action: str, ports: Sequence[PortSpec],
               hostname: str = "") -> bool: ...


class Firewall:
    def __init__(self, maps: RuleMaps) -> None:
        self.maps = maps
        # What the maps hold, so diffs and add_ip never read the kernel back.
        self.cidrs: dict[Network, CidrValue] = {n: (a, ps) for n, a, ps in maps.cidrs()}
        self.ports: dict[PortEntry, int] = {(n, p, pr): a for n, p, pr, a in maps.ports()}
        # Per address, its grants in order (a dict as an ordered set: a CDN address can carry
        # thousands of names, and every DNS answer adds to it).
        self.runtime: dict[Network, dict[Grant, None]] = {
            network: dict.fromkeys(grants)
            for network, grants in adopted_grants(self.cidrs, self.ports).items()}
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
        self.runtime.setdefault(network, {})[grant] = None
        for (port, proto), code in state.ports.items():
            self._put_port((network, port, proto), code)
        return self._put_cidr(network, state.lpm) or ports_changed

    def remove_ip(self, ip: str) -> None:
        network = host_network(ip)
        self.runtime.pop(network, None)
        self.state.networks.pop(network, None)
        if network in self.cidrs:
            self._delete_cidr(network)
        for entry in [e for e in self.ports if e[0] == network]:
            self._delete_port(entry)

    # ------------------------------------------------------------ whole policy

    def sync(self, policy: Policy) -> None:
        """Write what policy needs, keeping every entry already there (add-only)."""
        self.policy = policy
        self.state = desired_state(policy, self.runtime)
        self._move(self.state.cidr_entries(), self.state.port_entries(), delete=False)

    def program(self, policy: Policy, audit_mode: bool) -> None:
        """Move the maps from what they hold to what policy needs, by diff (see module doc)."""
        runtime = {network: dict.fromkeys(kept) for network, grants in self.runtime.items()
                   if (kept := rejudge(policy, network, grants))}
        state = desired_state(policy, runtime)
        final_config = ACTION_CODES[policy.default_action], audit_mode
        old_default, old_audit, generation = self.maps.get_config()
        relaxed = (ALLOW if ALLOW in (old_default, final_config[0]) else DENY,
                   old_audit or audit_mode, generation)
        self._move(state.cidr_entries(), state.port_entries(), delete=True,
                   relaxed_config=relaxed)
        self._set_config(*final_config, generation)
        self.policy, self.runtime, self.state = policy, runtime, state

    # ------------------------------------------------------------ map operations

    def _set_config(self, default_action: int, audit_mode: bool, generation: int) -> None:
        if self.maps.get_config() != (default_action, audit_mode, generation):
            self.maps.set_config(default_action, audit_mode, generation)

    def _move(self, cidrs: Mapping[Network, CidrValue], ports: Mapping[PortEntry, int],
              delete: bool, relaxed_config: tuple[int, bool, int] | None = None) -> None:
        """Write (and, if delete, remove) entries in the order of plan_move."""
        for operation in plan_move(self.cidrs, self.ports, cidrs, ports, delete):
            kind, *args = operation
            if kind == "put_cidr":
                self._put_cidr(*args)
            elif kind == "delete_cidr":
                self._delete_cidr(*args)
            elif kind == "put_port":
                self._put_port(*args)
            elif kind == "delete_port":
                self._delete_port(*args)
            elif relaxed_config is not None:
                self._set_config(*relaxed_config)

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

    def _delete_cidr(self, network: Network) -> None:
        self.maps.delete_cidr(network)
        del self.cidrs[network]

    def _delete_port(self, entry: PortEntry) -> None:
        self.maps.delete_port(*entry)
        del self.ports[entry]


def apply_existing_connection(updater: FirewallUpdater, plan: ExistingConnection) -> bool:
    """Perform an existing connection's writes; True when its record should be logged (it
    is blocked, or the last write changed the maps)."""
    changed = not plan.allowed
    for action, ports in plan.writes:
        changed = updater.add_ip(plan.dst_ip, action, ports)
    return changed
