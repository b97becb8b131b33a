"""The host side of the DNS redirect: its addresses on loopback, its map, start-up caches.

The cgroup hooks in bpf/sluice.c send every TCP/UDP connect and sendmsg to port 53 of a
non-loopback address to the proxy on the redirect addresses (pipeline/dns/endpoints.py),
which capture adds to `lo`: reachable from this network namespace and, through a bridge's
default route, from every container behind it. capture programs map_dns_redirect, and at
start clears what could let a name resolved before sluice started skip the just-in-time
path: systemd-resolved's cache and conntrack's port-53 flows. Each step says in one line
what it did or why it could not.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from . import libbpf
from .structs import DnsRedirect
from ..dns.endpoints import DNS_PORT, redirect_endpoints
from ..errors import KernelError, SettingsError

log = logging.getLogger("sluice.capture")

RESOLVED_COMM = "systemd-resolve"  # systemd-resolved, as /proc/<pid>/comm cuts it
DELETED = re.compile(r"(\d+) flow entr(?:y|ies) (?:has|have) been deleted")


def ipv6_available(proc: Path = Path("/proc")) -> bool:
    """IPv6 is enabled on loopback in this network namespace."""
    try:
        return (proc / "sys/net/ipv6/conf/lo/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


def _on_lo() -> set[str]:
    out = subprocess.run(["ip", "-json", "address", "show", "dev", "lo"], capture_output=True,
                         text=True)
    try:
        return {a["local"] for link in json.loads(out.stdout or "[]")
                for a in link.get("addr_info", [])}
    except (ValueError, KeyError, TypeError):
        return set()


def _ip_address(action: str, text: str) -> subprocess.CompletedProcess:
    prefix = ipaddress.ip_address(text).max_prefixlen
    return subprocess.run(["ip", "address", action, f"{text}/{prefix}", "dev", "lo"],
                          capture_output=True, text=True)


def add_addresses(addresses: list[str]) -> list[str]:
    """Put the redirect addresses on lo; returns those this call added (to remove later)."""
    present, added = _on_lo(), []
    for text in addresses:
        if text in present:
            continue
        result = _ip_address("add", text)
        if result.returncode != 0:
            raise KernelError(f"DNS redirect: cannot add {text} to lo: "
                              f"{result.stderr.strip() or result.returncode}")
        added.append(text)
    return added


def remove_addresses(addresses: list[str]) -> list[str]:
    present = _on_lo()
    return [text for text in addresses
            if text in present and _ip_address("del", text).returncode == 0]


def program_map(fd: int, enabled: bool, has_v6: bool) -> None:
    """map_dns_redirect: where the hooks send DNS (or that they leave it alone)."""
    v4, v6 = redirect_endpoints(True)
    value = DnsRedirect(enabled=int(enabled), has_v6=int(has_v6 and enabled),
                        port=socket.htons(DNS_PORT))
    ctypes.memmove(value.addr4, ipaddress.ip_address(v4.host).packed, 4)
    ctypes.memmove(value.addr6, ipaddress.ip_address(v6.host).packed, 16)
    libbpf.update(fd, ctypes.c_uint32(0), value)


def check_mark(mark: int, whose: str) -> None:
    """Marking sockets needs CAP_NET_ADMIN: without it sluice's own queries would be
    redirected to the proxy, so say so at start."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except OSError as err:
        raise SettingsError(f"SLUICE_DNS_REDIRECT: cannot mark {whose} ({err.strerror}; "
                            "needs CAP_NET_ADMIN): the redirect would send them to the "
                            "proxy") from None
    finally:
        probe.close()


def flush_resolved_cache(proc: Path = Path("/proc")) -> str:
    """SIGUSR2 makes systemd-resolved flush its caches (systemd-resolved(8))."""
    flushed = []
    for comm in proc.glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == RESOLVED_COMM:
                pid = int(comm.parent.name)
                os.kill(pid, signal.SIGUSR2)
                flushed.append(pid)
        except (OSError, ValueError):
            continue  # exited meanwhile
    if not flushed:
        return "systemd-resolved is not running: no resolver cache to flush"
    return f"flushed systemd-resolved's cache (pid {', '.join(map(str, flushed))})"


def clear_dns_conntrack() -> str:
    """Delete this network namespace's conntrack entries for port 53 (conntrack(8)), so no
    flow NATed before the redirect keeps going around it."""
    if shutil.which("conntrack") is None:
        return ("no conntrack tool (apt install conntrack; ./bootstrap does): port-53 "
                "conntrack entries not cleared")
    cleared = 0
    for family in ("ipv4", "ipv6"):
        for proto in ("udp", "tcp"):
            result = subprocess.run(["conntrack", "-D", "-f", family, "-p", proto,
                                     "--dport", "53"], capture_output=True, text=True)
            # "... N flow entries have been deleted." on stderr, also for 0 (exit 1 then).
            deleted = DELETED.search(result.stderr)
            if deleted:
                cleared += int(deleted.group(1))
            elif result.returncode != 0:
                return (f"conntrack not available ({result.stderr.strip()[:120]}): no DNS "
                        "flows to clear")
    return f"cleared {cleared} conntrack entr{'y' if cleared == 1 else 'ies'} for port 53"
