"""The policy: rules users write, how they match, and what the firewall maps should hold.

Everything here is pure (no sockets, no BPF, no clock, no environment): time and file
contents are passed in. pipeline.firewall.writer writes the maps from it; pipeline/startup.py adds
what the host needs (it reads resolv.conf and DMI, so it is not in here).
"""

from .autoallow import (add_search_domains, cloud_metadata_allows, detect_cloud_provider,
                        ensure_dns_allowed, ensure_hostname_allowed, ensure_infra_allowed,
                        get_auto_allowed_type, get_auto_allowed_type_for_hostname,
                        resolvers_from_resolv_conf)
from .cidrs import Conflict
from .existing import ExistingConnection, gate_existing_connection, scan_connections
from .explain import explain, render_table
from .load import (InvalidPolicy, load_policy, load_policy_file, policy_from_settings,
                   policy_from_text)
from .mapstate import Grant, side_grants
from .model import Policy
from .namecache import HostnameCache
from .ports import ports_cover, protocols_overlap, union_ports
from .rules import Rule
from .verdict import HostnameVerdict, PortSpec

__all__ = [
    "Conflict", "ExistingConnection", "Grant", "HostnameCache", "HostnameVerdict",
    "InvalidPolicy", "Policy", "PortSpec", "Rule", "add_search_domains",
    "cloud_metadata_allows", "detect_cloud_provider", "ensure_dns_allowed",
    "ensure_hostname_allowed", "ensure_infra_allowed", "explain", "gate_existing_connection",
    "get_auto_allowed_type", "get_auto_allowed_type_for_hostname", "load_policy",
    "load_policy_file", "policy_from_settings", "policy_from_text", "ports_cover",
    "protocols_overlap", "render_table", "resolvers_from_resolv_conf", "scan_connections",
    "side_grants", "union_ports",
]
