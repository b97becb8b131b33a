"""CI presets (reference §6.2): the services a CI job itself needs, allowed and tagged.

Without them an enforce-mode job with a tight allowlist breaks its own artifact, cache and
token calls. Each preset allows a list of hosts on 443/tcp (a setting, so it can be changed)
plus the host and port of every service URL the CI system hands the job in its environment.
An address instead of a name becomes a CIDR rule for that address alone.
"""

from __future__ import annotations

import collections
import ipaddress
import urllib.parse
from collections.abc import Mapping

from typing import TYPE_CHECKING

from .autoallow import ensure_hostname_allowed, ensure_infra_allowed
from .envform import split_list
from .model import Policy
from .verdict import PortSpec

if TYPE_CHECKING:
    from ..settings import Settings

URL_VARIABLES = {
    "github": ("ACTIONS_RUNTIME_URL", "ACTIONS_RESULTS_URL", "ACTIONS_CACHE_URL",
               "ACTIONS_ID_TOKEN_REQUEST_URL"),
    "gitlab": ("CI_SERVER_URL", "CI_API_V4_URL", "CI_REGISTRY", "CI_REPOSITORY_URL",
               "CI_PAGES_URL", "CI_DEPENDENCY_PROXY_SERVER", "CI_PROJECT_URL"),
}
TAGS = {"github": "github_service", "gitlab": "gitlab_service"}
DEFAULT_PORTS = {"https": 443, "http": 80}


def service_endpoint(value: str) -> tuple[str, int] | None:
    """(host, port) of a URL (`https://host[:port]/...`) or a bare `host[:port]`
    (CI_REGISTRY's form); None when there is no host in it."""
    text = value.strip()
    if not text:
        return None
    parsed = urllib.parse.urlsplit(text if "://" in text else f"https://{text}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:  # a port that is not a number, or out of range
        return None
    if not host:
        return None
    return host.lower().rstrip("."), port or DEFAULT_PORTS.get(parsed.scheme, 443)


def preset_endpoints(preset: str, hosts: str, ci_env: Mapping[str, str]) -> dict[str, set[int]]:
    """host -> ports the preset allows."""
    wanted: dict[str, set[int]] = collections.defaultdict(set)
    for host in split_list(hosts):
        wanted[host.lower().rstrip(".")].add(443)
    for variable in URL_VARIABLES[preset]:
        endpoint = service_endpoint(ci_env.get(variable, ""))
        if endpoint:
            wanted[endpoint[0]].add(endpoint[1])
    return dict(wanted)


def ci_service_allows(policy: Policy, settings: Settings) -> Policy:
    """The policy plus the active preset's services (none without a preset)."""
    preset = settings.ci_preset
    if not preset:
        return policy
    hosts = getattr(settings, f"{preset}_service_hosts")
    tag = TAGS[preset]
    for host, ports in sorted(preset_endpoints(preset, hosts, settings.ci_env).items()):
        specs = [PortSpec(port, "tcp") for port in sorted(ports)]
        if _is_address(host):
            policy = ensure_infra_allowed(policy, [host], specs, tag)
        else:
            policy = ensure_hostname_allowed(policy, host, specs, tag)
    return policy


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
