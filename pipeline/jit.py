"""Just-in-time firewall writes: late-allow of a blocked event, and a resolved name's answer.

Both apply one hostname verdict to one address the same way (reference §5.4 apply_side):
the deny side first, then the allow side, each through the CIDR conflict check (which the
reference skipped for late-allow, letting a /32 allow override a CIDR deny) and skipped when
the outcome equals the default action. The firewall is passed in, so tests use the
dict-backed maps; nothing here reads a clock or a socket.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from .events import IPPROTO_TCP, IPPROTO_UDP, EnrichedEvent
from .firewall import Firewall
from .policy.model import Policy
from .policy.ports import ports_cover
from .policy.verdict import HostnameVerdict, PortSpec

log = logging.getLogger("sluice.policy")

_RULE_PROTOCOLS = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}


def apply_side(policy: Policy, firewall: Firewall, ip: str, action: str,
               ports: Sequence[PortSpec], hostname: str) -> bool:
    """Write one side of a verdict for ip; True when the maps now allow it for these ports."""
    final = policy.ip_write_action(ip, action, ports)
    if final is None:
        return False
    try:
        firewall.add_ip(ip, final, ports, hostname)
    except OSError as err:
        log.warning("map write for %s failed: %s", ip, err)
        return False
    return final == "allow"


def apply_verdict(policy: Policy, firewall: Firewall, ip: str, verdict: HostnameVerdict,
                  hostname: str) -> bool:
    """Deny side first, then allow side; True when the allow side was written."""
    allow_ports = verdict.allow_ports
    if verdict.has_deny:
        apply_side(policy, firewall, ip, "deny", verdict.deny_ports, hostname)
        allow_ports = without_denied(allow_ports, verdict.deny_ports)
        if allow_ports is None:
            return False
    if verdict.has_allow:
        return apply_side(policy, firewall, ip, "allow", allow_ports, hostname)
    return False


def without_denied(allow: Sequence[PortSpec],
                   deny: Sequence[PortSpec]) -> tuple[PortSpec, ...] | None:
    """The allow side of a mixed verdict minus what its deny side names, so the allow write
    cannot overwrite the deny entries just written (cargowall let `all 443` reopen a denied
    `udp 443`). None when nothing is left. An all-ports allow stays all ports: the maps
    cannot say "all but", so a port-specific deny beside it is inert, as in cargowall."""
    if not allow:
        return ()
    if not deny:
        return None  # a deny side with no ports denies every port
    kept: list[PortSpec] = []
    for spec in allow:
        parts = [(spec.port, p) for p in ("tcp", "udp")] if spec.protocol == "all" else [
            (spec.port, spec.protocol)]
        if spec.protocol == "all":
            parts.append((0, "icmp"))
        left = [(port, p) for port, p in parts if not ports_cover(deny, port, p)]
        if len(left) == len(parts):
            kept.append(spec)
        else:
            kept.extend(PortSpec(port, p) for port, p in left)
    return tuple(kept) or None


def late_allow(policy: Policy, firewall: Firewall | None, event: EnrichedEvent) -> str | None:
    """Reference §2.3: open a blocked destination whose name an allow rule matches. Returns
    the allow rule's value when the event's own port and protocol are now allowed."""
    protocol = _RULE_PROTOCOLS.get(event.ip_proto)
    if firewall is None or event.allowed or not event.dst_hostname or protocol is None:
        return None
    verdict = policy.match_hostname(event.dst_hostname)
    if not verdict.has_allow:
        return None
    if not apply_verdict(policy, firewall, event.dst_ip, verdict, event.dst_hostname):
        return None
    if not ports_cover(verdict.allow_ports, event.dst_port, protocol):
        return None
    if verdict.has_deny and ports_cover(verdict.deny_ports, event.dst_port, protocol):
        return None
    return verdict.allow_rule


@dataclasses.dataclass(slots=True)
class AnswerWrites:
    """What one resolved name did to the maps."""

    verdict: HostnameVerdict
    allowed_ips: list[str]


def allow_answer(policy: Policy, firewall: Firewall, name: str,
                 ips: Sequence[str]) -> AnswerWrites:
    """A DNS answer for name: apply its verdict to every address before the answer goes out."""
    verdict = policy.match_hostname(name)
    allowed = [ip for ip in ips if apply_verdict(policy, firewall, ip, verdict, name)]
    return AnswerWrites(verdict, allowed)
