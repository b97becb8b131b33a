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
from collections.abc import Sequence

from .events import IPPROTO_TCP, IPPROTO_UDP, EnrichedEvent
from .firewall import FirewallUpdater
from .policy.mapstate import side_grants
from .policy.model import Policy
from .policy.ports import ports_cover
from .policy.verdict import HostnameVerdict

log = logging.getLogger("sluice.policy")

_RULE_PROTOCOLS = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}


def apply_verdict(policy: Policy, firewall: FirewallUpdater, ip: str, verdict: HostnameVerdict,
                  hostname: str) -> bool:
    """Deny side first, then allow side (side_grants: conflict-checked, nothing equal to the
    default); True when the maps now allow ip for the allow side's ports. A port the deny
    side names stays denied: the firewall keeps port denies sticky."""
    allowed = False
    for grant in side_grants(policy, ip, verdict, hostname):
        try:
            firewall.add_ip(ip, grant.action, grant.ports, hostname)
        except OSError as err:
            log.warning("map write for %s failed: %s", ip, err)
            return False
        allowed = grant.action == "allow"
    return allowed


def late_allow(policy: Policy, firewall: FirewallUpdater | None,
               event: EnrichedEvent) -> str | None:
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


def allow_answer(policy: Policy, firewall: FirewallUpdater, name: str,
                 ips: Sequence[str]) -> AnswerWrites:
    """A DNS answer for name: apply its verdict to every address before the answer goes out."""
    verdict = policy.match_hostname(name)
    allowed = [ip for ip in ips if apply_verdict(policy, firewall, ip, verdict, name)]
    return AnswerWrites(verdict, allowed)
