"""The policy every stage judges by: the loaded one plus what sluice itself needs.

The policy, dns and enrich stages all load it (through pipeline/livepolicy.py), so the DNS
filter, the map writer and the namer agree on the same rules, including the auto-allowed DNS
upstream (the one the proxy really forwards to). It reads the host (resolv.conf, DMI), so it
lives outside the pure policy/ package, and it joins policy/ and dns/ without either
importing the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .dns.endpoints import RESOLVED_UPSTREAMS, Endpoint, choose_upstream, parse_listen
from .hostfiles import HostFiles
from .policy.autoallow import cloud_metadata_allows, ensure_infra_allowed
from .policy.cipresets import ci_service_allows
from .policy.load import load_policy
from .policy.model import Policy
from .policy.verdict import PortSpec

if TYPE_CHECKING:
    from .settings import Settings

DNS_PORTS = (PortSpec(53, "udp"), PortSpec(53, "tcp"))  # the proxy retries over TCP




def proxy_upstream(settings: Settings, files: HostFiles) -> Endpoint:
    """The Endpoint the DNS proxy forwards to; ValueError when it has none to use."""
    return choose_upstream(settings.dns_upstream, files.read("/etc/resolv.conf"),
                           parse_listen(settings.dns_listen), redirect=settings.dns_redirect,
                           resolved_conf=files.read(RESOLVED_UPSTREAMS))


def dns_upstreams(settings: Settings, files: HostFiles) -> list[str]:
    """The address the DNS proxy forwards to, or none when it has none to use."""
    try:
        return [proxy_upstream(settings, files).host]
    except ValueError:
        return []


def startup_policy(policy: Policy, settings: Settings, files: HostFiles) -> Policy:
    """The loaded policy plus the infrastructure sluice itself needs."""
    policy = ensure_infra_allowed(policy, dns_upstreams(settings, files), DNS_PORTS, "dns")
    if settings.auto_allow_cloud_metadata:
        policy = cloud_metadata_allows(
            policy, files.read(RESOLVED_UPSTREAMS),
            files.read("/sys/class/dmi/id/sys_vendor"),
            files.read("/sys/class/dmi/id/chassis_asset_tag"))
    return ci_service_allows(policy, settings)


def load_startup_policy(settings: Settings, files: HostFiles) -> Policy:
    return startup_policy(load_policy(settings), settings, files)

