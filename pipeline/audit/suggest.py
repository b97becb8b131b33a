"""`sluice suggest`: draft a policy (cargowall's JSON schema) that would allow what was seen.

Seen: connection_allowed and connection_late_allowed rows, except those that rules sluice
adds itself allowed (auto_allowed_type), and the connection_blocked and protocol_blocked
rows of audit-mode runs (would_deny): what audit mode says the policy would have blocked.
Blocks of enforce-mode runs are left out: they were refused on purpose.

A destination with a name gets a hostname rule under that name (a CNAME chain's origin: the
name the dns stage judges), one without a CIDR rule for its address alone, each with the
ports and protocols observed. Sibling names (at least `min_siblings` names one label below
one parent) are grouped: under the parent's own rule when the parent was seen too, else
under a `*.parent` glob; only where the parent is at or below a registrable domain
(publicsuffixlist), so no rule opens a public suffix such as `*.github.io` or `*.co.uk`.
Every seen name is then judged by the real matcher against the draft; a group under which
one is not allowed (a parent-domain rule outranks a glob) is split back into exact rules.
Protocols a policy cannot allow (GRE and the like) are reported, not drafted.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
from collections.abc import Iterable

import sqlalchemy as sa
from publicsuffixlist import PublicSuffixList

from .timestamps import TimeError, parse_moment, sql_timestamp
from ..errors import ExitCode, SluiceError
from ..policy.hostnames import hostname_problem
from ..policy.load import policy_from_text
from ..policy.model import Policy
from ..policy.ports import ports_cover
from ..policy.verdict import PortSpec
from .store import open_readonly

RULE_PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "ICMP": "icmp"}
SEEN_SQL = """
SELECT DISTINCT dst_hostname, cname_chain, dst_ip, dst_port, protocol FROM audit_events
WHERE ((event_type IN ('connection_allowed', 'connection_late_allowed')
        AND auto_allowed_type = '')
       OR (event_type IN ('connection_blocked', 'protocol_blocked') AND would_deny))
  AND timestamp >= :since AND (:host = '' OR host = :host)
"""


class SuggestError(SluiceError):
    exit_code = ExitCode.BAD_INPUT


@dataclasses.dataclass(frozen=True, slots=True)
class Seen:
    """One observed destination: a name (or "") and an address, with a port and protocol."""

    hostname: str
    ip: str
    port: int
    protocol: str  # tcp, udp or icmp


def parse_since(text: str, now_ns: int) -> int:
    """An RFC 3339 time, a date, or an age such as 90m, 24h or 7d -> UTC nanoseconds."""
    try:
        return parse_moment(text, "--since", now_ns)
    except TimeError as err:
        raise SuggestError(str(err)) from None


def seen_in(url: str, since_ns: int, host: str) -> tuple[list[Seen], list[str]]:
    """What the store saw, and a line for each destination no policy can allow."""
    engine = open_readonly(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(SEEN_SQL),
                                {"since": sql_timestamp(since_ns), "host": host}).fetchall()
    except sa.exc.SQLAlchemyError as err:
        raise SuggestError(f"cannot read the store: {' '.join(str(err).split())[:200]}") from None
    finally:
        engine.dispose()
    seen, left_out = set(), set()
    for hostname, chain, ip, port, protocol in rows:
        rule_protocol = RULE_PROTOCOLS.get(protocol)
        if rule_protocol is None:
            left_out.add(f"{protocol} to {ip}: only TCP, UDP and ICMP can be allowed")
        elif rule_protocol == "icmp":
            if ipaddress.ip_address(ip).version == 4:  # ICMPv6 always passes
                seen.add(Seen("", ip, 0, "icmp"))
        else:
            seen.add(Seen(_rule_name(hostname, chain), ip, port, rule_protocol))
    return sorted(seen, key=dataclasses.astuple), sorted(left_out)


def _rule_name(hostname: str, chain: str) -> str:
    name = (json.loads(chain)[0] if chain else hostname).lower().rstrip(".")
    return "" if not name or hostname_problem(name) else name


# ---------------------------------------------------------------- drafting

def sibling_groups(names: Iterable[str], min_siblings: int,
                   psl: PublicSuffixList) -> dict[str, list[str]]:
    """parent -> its seen children, where grouping them opens no public suffix."""
    children = collections.defaultdict(list)
    for name in names:
        if "." in name:
            children[name.split(".", 1)[1]].append(name)
    return {parent: sorted(kids) for parent, kids in children.items()
            if min_siblings and len(kids) >= min_siblings and psl.privatesuffix(parent)}


def _rule(rule_type: str, value: str, ports: set[PortSpec]) -> dict:
    return {"type": rule_type, "value": value, "action": "allow",
            "ports": [{"port": p.port, "protocol": p.protocol}
                      for p in sorted(ports, key=lambda p: (p.protocol, p.port))]}


def _document(names: dict[str, set[PortSpec]], ips: dict[str, set[PortSpec]],
              groups: dict[str, list[str]]) -> dict:
    values: dict[str, set[PortSpec]] = collections.defaultdict(set)
    group_of = {child: parent for parent, kids in groups.items() for child in kids}
    for name, ports in names.items():
        parent = group_of.get(name)
        value = name if parent is None else parent if parent in names else f"*.{parent}"
        values[value] |= ports
    hostnames = sorted(values, key=lambda v: v.split(".")[::-1])
    addresses = sorted(ips, key=lambda ip: (ipaddress.ip_address(ip).version,
                                            ipaddress.ip_address(ip)))
    return {"defaultAction": "deny", "rules": [
        *(_rule("hostname", v, values[v]) for v in hostnames),
        *(_rule("cidr", str(ipaddress.ip_network(ip)), ips[ip]) for ip in addresses)]}


def name_allowed(policy: Policy, name: str, ports: Iterable[PortSpec]) -> bool:
    """Whether the policy's hostname rules admit name on every one of these ports."""
    verdict = policy.match_hostname(name)
    return verdict.has_allow and all(
        ports_cover(verdict.allow_ports, p.port, p.protocol)
        and not (verdict.has_deny and ports_cover(verdict.deny_ports, p.port, p.protocol))
        for p in ports)


def draft_policy(seen: Iterable[Seen], min_siblings: int = 2,
                 psl: PublicSuffixList | None = None) -> dict:
    """The policy document that allows everything in seen."""
    names: dict[str, set[PortSpec]] = collections.defaultdict(set)
    ips: dict[str, set[PortSpec]] = collections.defaultdict(set)
    for s in seen:
        (names[s.hostname] if s.hostname else ips[s.ip]).add(PortSpec(s.port, s.protocol))
    groups = sibling_groups(names, min_siblings, psl or PublicSuffixList())
    while True:
        document = _document(names, ips, groups)
        policy = policy_from_text(json.dumps(document), "suggestion")
        split = {parent for parent, kids in groups.items()
                 if not all(name_allowed(policy, kid, names[kid]) for kid in kids)}
        if not split:
            return document
        groups = {parent: kids for parent, kids in groups.items() if parent not in split}
