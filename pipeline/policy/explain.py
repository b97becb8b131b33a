"""Which rule decides a name or an address, and why (`sluice policy explain`), and the
resolved rule table (`sluice policy check`).

An address is judged the way the classifier judges it: the most specific CIDR entry decides
unless it is port specific, then the most specific port entry, then the default action. A
hostname is judged by its verdict; its addresses are written into the maps at DNS time, when
a CIDR rule covering an address can still override the hostname rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .cidrs import Address, parse_address
from .mapstate import ACTION_NAMES, MapState, desired_state
from .model import Policy
from .ports import PROTOCOL_NUMBERS, format_ports, ports_cover, ports_json
from .rules import Rule
from .verdict import HostnameVerdict, PortSpec

EXPLAIN_PROTOCOLS = ("tcp", "udp", "icmp")
_DONE = {"allow": "allowed", "deny": "denied"}


def explain(policy: Policy, target: str, port: int | None = None,
            protocol: str | None = None) -> dict[str, Any]:
    """{"target", "allow_rule", "allow_ports", "deny_rule", "deny_ports", "decision",
    "reason"}; decision is for port/protocol when given, else for the target as a whole."""
    if protocol is not None and protocol not in EXPLAIN_PROTOCOLS:
        raise ValueError(f"protocol must be tcp, udp or icmp, not {protocol!r}")
    if protocol == "icmp":
        port = 0
    elif port is not None and protocol is None:
        protocol = "tcp"
    target = target.strip()
    addr = _address(target)
    if addr is not None:
        return _explain_address(policy, addr, port, protocol)
    return _explain_hostname(policy, target.lower().rstrip("."), port, protocol)


def _address(target: str) -> Address | None:
    try:
        return parse_address(target.strip("[]"))
    except ValueError:
        return None


def _result(target: str, allow: tuple[str, Sequence[PortSpec]] | None,
            deny: tuple[str, Sequence[PortSpec]] | None, decision: str,
            reason: str) -> dict[str, Any]:
    allow_rule, allow_ports = allow or ("", ())
    deny_rule, deny_ports = deny or ("", ())
    return {"target": target,
            "allow_rule": allow_rule, "allow_ports": ports_json(allow_ports),
            "deny_rule": deny_rule, "deny_ports": ports_json(deny_ports),
            "decision": decision, "reason": reason}


def _what(port: int | None, protocol: str | None) -> str:
    return "icmp" if protocol == "icmp" else f"{port}/{protocol}"


# ------------------------------------------------------------------ hostnames


def _explain_hostname(policy: Policy, name: str, port: int | None,
                      protocol: str | None) -> dict[str, Any]:
    verdict = policy.match_hostname(name)
    allow = (verdict.allow_rule, verdict.allow_ports) if verdict.has_allow else None
    deny = (verdict.deny_rule, verdict.deny_ports) if verdict.has_deny else None
    if not verdict.matched:
        decision = policy.default_action
        reason = _unmatched_name_reason(policy, name)
    elif port is None or protocol is None:  # explain() sets a protocol whenever a port
        decision = _name_decision(verdict)
        reason = _sides_sentence(policy, name, verdict)
    else:
        decision, detail = _name_port_decision(policy, verdict, port, protocol)
        reason = f"{_sides_sentence(policy, name, verdict)} For {_what(port, protocol)}: {detail}"
    if verdict.matched:
        reason += (f" Hostname rules apply at DNS time: when {name} resolves, its addresses are "
                   "written into the firewall maps before the answer is returned, and a CIDR "
                   "rule covering an address can still override them.")
    return _result(name, allow, deny, decision, reason)


def _name_decision(verdict: HostnameVerdict) -> str:
    """The name as a whole: usable if it has an allow side an all-ports deny does not undo."""
    if verdict.has_allow and not (verdict.has_deny and not verdict.deny_ports):
        return "allow"
    return "deny"


def _name_port_decision(policy: Policy, verdict: HostnameVerdict, port: int,
                        protocol: str) -> tuple[str, str]:
    if not verdict.has_allow:
        return "deny", "DNS queries for the name are refused, so nothing connects by name."
    if verdict.has_deny and not verdict.deny_ports:
        return "deny", "the all-ports deny wins over any allow."
    if not verdict.allow_ports:
        return "allow", "the allow covers all ports (a port-limited deny cannot narrow it)."
    if verdict.has_deny and ports_cover(verdict.deny_ports, port, protocol):
        return "deny", "the deny side names this port."
    if ports_cover(verdict.allow_ports, port, protocol):
        return "allow", "the allow side names this port."
    return policy.default_action, (f"no rule names this port; the default action "
                                   f"({policy.default_action}) applies.")


def _sides_sentence(policy: Policy, name: str, verdict: HostnameVerdict) -> str:
    parts = []
    if verdict.has_allow:
        parts.append(f"allowed on {format_ports(verdict.allow_ports)} by "
                     f"{_match_kind(policy, name, verdict.allow_rule)}")
    if verdict.has_deny:
        parts.append(f"denied on {format_ports(verdict.deny_ports)} by "
                     f"{_match_kind(policy, name, verdict.deny_rule)}")
    mixed = "; a mixed verdict, whose deny side is written first" if len(parts) == 2 else ""
    return f"{name} is {' and '.join(parts)}{mixed}."


def _match_kind(policy: Policy, name: str, rule_value: str) -> str:
    full, stripped, short = policy.hostnames.forms(name)
    labels = {"exact": "the exact rule", "parent": "the parent-domain rule",
              "pattern": "the glob rule"}
    if full is not None and full.rule.value == rule_value:
        return f'{labels[full.kind]} "{rule_value}"'
    kind = labels[short.kind] if short is not None else "the rule"
    return f'{kind} "{rule_value}" (matching {stripped} after its search domain is stripped)'


def _unmatched_name_reason(policy: Policy, name: str) -> str:
    reason = (f"No hostname rule matches {name}; the default action ({policy.default_action}) "
              "applies, after any CIDR rule covering the addresses it resolves to.")
    if policy.under_user_search_domain(name):
        reason += (" DNS queries for it pass because it is under a search domain, but that "
                   "does not open its addresses.")
    return reason


# ------------------------------------------------------------------ addresses


def _explain_address(policy: Policy, addr: Address, port: int | None,
                     protocol: str | None) -> dict[str, Any]:
    state = desired_state(policy, {})
    rules = list(policy.cidrs.containing(addr))
    lpm_rule = next((r for r in rules if not _wildcard(r)), None)
    target = str(addr)
    if lpm_rule is not None and not state.networks[lpm_rule.network].lpm[1]:
        action = ACTION_NAMES[state.networks[lpm_rule.network].lpm[0]]
        rule = next(r for r in rules if r.network == lpm_rule.network and r.action == action
                    and not r.ports)
        side = (rule.value, ())
        reason = (f"{target} is {_DONE[action]} on all ports by the CIDR rule {rule.value}, the "
                  "most specific CIDR rule containing it.")
        return _result(target, side if action == "allow" else None,
                       side if action == "deny" else None, action, reason)
    port_rules = [r for r in rules if r.ports]
    allow = next(((r.value, r.ports) for r in port_rules if r.action == "allow"), None)
    deny = next(((r.value, r.ports) for r in port_rules if r.action == "deny"), None)
    if port is None or protocol is None:  # explain() sets a protocol whenever a port
        decision = "allow" if allow or policy.default_action == "allow" else "deny"
        reason = _port_rules_reason(policy, target, port_rules)
        return _result(target, allow, deny, decision, reason)
    decision, reason = _address_port_decision(policy, state, addr, port_rules, port, protocol)
    return _result(target, allow, deny, decision, reason)


def _wildcard(rule: Rule) -> bool:
    return rule.network.prefixlen == 0 and bool(rule.ports)


def _address_port_decision(policy: Policy, state: MapState, addr: Address,
                           port_rules: Sequence[Rule], port: int,
                           protocol: str) -> tuple[str, str]:
    key = (port, PROTOCOL_NUMBERS[protocol])
    for rule in port_rules:
        states = state.wildcards if _wildcard(rule) else state.networks
        code = states[rule.network].ports.get(key)
        if code is not None:
            action = ACTION_NAMES[code]
            deciding = next(r.value for r in port_rules if r.network == rule.network
                            and r.action == action and ports_cover(r.ports, port, protocol))
            return action, (f"{addr} is {_DONE[action]} on {_what(port, protocol)} by the CIDR "
                            f"rule {deciding}, the most specific rule naming that port.")
    return policy.default_action, (f"No CIDR rule names {_what(port, protocol)} for {addr}; the "
                                   f"default action ({policy.default_action}) applies.")


def _port_rules_reason(policy: Policy, target: str, port_rules: Sequence[Rule]) -> str:
    if not port_rules:
        return (f"No CIDR rule contains {target}; the default action ({policy.default_action}) "
                "applies.")
    listed = "; ".join(f"{r.action} {format_ports(r.ports)} by {r.value}" for r in port_rules)
    return (f"CIDR rules containing {target} name ports ({listed}); other ports follow the "
            f"default action ({policy.default_action}).")


# ------------------------------------------------------------------ the rule table


def render_table(policy: Policy) -> str:
    """The resolved rules, one row each, under a header of default action and search domains."""
    header = ["#", "type", "value", "action", "ports", "auto"]
    rows = [[str(i), r.type + (" (glob)" if r.is_pattern else ""), r.value, r.action,
             format_ports(r.ports), r.auto_added_type] for i, r in enumerate(policy.rules)]
    widths = [max(len(row[c]) for row in (header, *rows)) for c in range(len(header))]
    lines = [f"source: {policy.source or 'inline'}",
             f"default action: {policy.default_action}",
             f"search domains: {', '.join(policy.search_domains) or '(none)'}", ""]
    for row in (header, *rows):
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
    if not rows:
        lines.append("(no rules)")
    return "\n".join(lines) + "\n"
