"""Opening the firewall for a hostname: late-allow of a blocked event, and a DNS answer.

Both apply one hostname verdict to one address the same way (reference §5.4 apply_side):
the deny side first, then the allow side, each through the CIDR conflict check (which the
reference skipped for late-allow, letting a /32 allow override a CIDR deny) and skipped when
the outcome equals the default action. Late-allow is planned without touching the maps
(plan_late_allow: pure, for pipeline/firewall/outcome.py) and written by the policy stage
(write_plan); a DNS answer is written at once. The firewall is passed in, so tests use the
dict-backed maps; nothing here reads a clock or a socket.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from ..events import IPPROTO_TCP, IPPROTO_UDP, EnrichedEvent
from .writer import FirewallUpdater
from ..policy.mapstate import Grant, side_grants
from ..policy.model import Policy
from ..policy.ports import ports_cover
from ..policy.verdict import HostnameVerdict

log = logging.getLogger("sluice.policy")

_RULE_PROTOCOLS = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}


def write_grants(firewall: FirewallUpdater, ip: str, grants: Sequence[Grant]) -> bool:
    """Write grants for ip in order; False when a write failed (logged; the rest not tried)."""
    for grant in grants:
        try:
            firewall.add_ip(ip, grant.action, grant.ports, grant.hostname)
        except OSError as err:
            log.warning("map write for %s failed: %s", ip, err)
            return False
    return True


def _opens(grants: Sequence[Grant]) -> bool:
    """The grants end with an allow: the address is open for the allow side's ports. A port
    the deny side names stays denied: the firewall keeps port denies sticky."""
    return bool(grants) and grants[-1].action == "allow"


def apply_verdict(policy: Policy, firewall: FirewallUpdater, ip: str,
                  verdict: HostnameVerdict, hostname: str) -> bool:
    """Deny side first, then allow side (side_grants: conflict-checked, nothing equal to the
    default); True when the maps now allow ip for the allow side's ports."""
    grants = side_grants(policy, ip, verdict, hostname)
    return write_grants(firewall, ip, grants) and _opens(grants)


@dataclasses.dataclass(frozen=True, slots=True)
class LateAllowPlan:
    """The map writes that open a blocked destination whose name an allow rule matches
    (reference §2.3), deny side first. `rule`: the allow rule's value, the record's
    matched_rule when `covers` (the event's own port and protocol pass once written)."""

    ip: str
    grants: tuple[Grant, ...]
    rule: str
    covers: bool


def plan_late_allow(policy: Policy, event: EnrichedEvent) -> LateAllowPlan | None:
    """The writes late-allow asks for a blocked TCP/UDP event, or None when it asks none."""
    protocol = _RULE_PROTOCOLS.get(event.ip_proto)
    if event.allowed or not event.dst_hostname or protocol is None:
        return None
    verdict = policy.match_hostname(event.dst_hostname)
    if not verdict.has_allow:
        return None
    grants = tuple(side_grants(policy, event.dst_ip, verdict, event.dst_hostname))
    if not grants:
        return None
    port = event.dst_port
    covers = (_opens(grants) and ports_cover(verdict.allow_ports, port, protocol)
              and not (verdict.has_deny and ports_cover(verdict.deny_ports, port, protocol)))
    return LateAllowPlan(event.dst_ip, grants, verdict.allow_rule, covers)


def write_plan(firewall: FirewallUpdater | None, plan: LateAllowPlan) -> bool:
    """Apply a late-allow plan; False when there are no maps yet or a write failed."""
    return firewall is not None and write_grants(firewall, plan.ip, plan.grants)


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
