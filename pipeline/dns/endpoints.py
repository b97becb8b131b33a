"""Listen and upstream addresses of the proxy, and the upstream resolv.conf implies.

With the DNS redirect on, the proxy also answers on the redirect addresses, where the cgroup
hooks send every query to a non-loopback resolver (pipeline/kernel/redirect.py puts them on
loopback). A resolver on this host is then never the upstream: its own upstream queries
would be redirected back to the proxy. systemd-resolved's stub (127.0.0.53) names its real
upstreams in /run/systemd/resolve/resolv.conf, which is where the proxy forwards instead.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

DNS_PORT = 53
# Link-local (IPv4) and unique-local (IPv6): reachable from containers through their default
# route, never routed beyond this host; the proxy listens here when the redirect is on.
REDIRECT_V4 = "169.254.53.53"
REDIRECT_V6 = "fd53:51ce::53"
RESOLVED_STUBS = ("127.0.0.53", "127.0.0.54")  # systemd-resolved's stub listeners
RESOLVED_UPSTREAMS = "/run/systemd/resolve/resolv.conf"


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    host: str   # canonical address text
    port: int

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.host).version

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, default_port: int = DNS_PORT) -> Endpoint:
    """`1.2.3.4`, `1.2.3.4:53`, `::1` or `[::1]:53`; ValueError says what is wrong."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [address]:port")
        port = _port(rest[1:], text) if rest else default_port
    elif text.count(":") == 1:
        host, _, raw_port = text.partition(":")
        port = _port(raw_port, text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (names are not resolved here)") from None
    return Endpoint(str(address), port)


def _port(raw: str, text: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{text!r} has no valid port (1-65535)")
    return int(raw)


def parse_listen(text: str) -> tuple[Endpoint, ...]:
    """SLUICE_DNS_LISTEN: one or more specific addresses. A wildcard would answer on every
    interface, which makes an open resolver of the host, so it is refused."""
    parts = [part for part in text.split(",") if part.strip()]
    endpoints = tuple(dict.fromkeys(parse_endpoint(part) for part in parts))
    if not endpoints:
        raise ValueError("at least one address is needed")
    for endpoint in endpoints:
        if ipaddress.ip_address(endpoint.host).is_unspecified:
            raise ValueError(f"{endpoint} is a wildcard: the proxy would answer on every "
                             "interface; name the addresses instead")
    return endpoints


def redirect_endpoints(has_v6: bool) -> tuple[Endpoint, ...]:
    """Where the redirect sends queries (port 53 always: the hooks keep no port table)."""
    v4 = Endpoint(REDIRECT_V4, DNS_PORT)
    return (v4, Endpoint(REDIRECT_V6, DNS_PORT)) if has_v6 else (v4,)


def _loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def nameservers(resolv_conf: str) -> list[str]:
    """The nameserver addresses of a resolv.conf, in order; unparseable ones are skipped."""
    found = []
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(fields[1].split("%", 1)[0])))
            except ValueError:
                continue
    return found


def default_upstream(resolv_conf: str, listen: Iterable[Endpoint], *, redirect: bool = False,
                     resolved_conf: str = "") -> Endpoint | None:
    """The first resolv.conf nameserver that is not this proxy (which would loop). With the
    redirect on, a resolver on loopback cannot be the upstream either: systemd-resolved's
    stub stands for the upstreams it names in resolved_conf, any other one is skipped."""
    ours = set(listen)
    for host in nameservers(resolv_conf):
        if not redirect or not _loopback(host):
            candidates = [host]
        elif host in RESOLVED_STUBS:
            candidates = [h for h in nameservers(resolved_conf) if not _loopback(h)]
        else:
            candidates = []
        for candidate in (Endpoint(h, DNS_PORT) for h in candidates):
            if candidate not in ours:
                return candidate
    return None


def choose_upstream(setting: str, resolv_conf: str, listen: Iterable[Endpoint], *,
                    redirect: bool = False, resolved_conf: str = "") -> Endpoint:
    """SLUICE_DNS_UPSTREAM, else the resolv.conf default; ValueError when there is none or
    when it would loop back to the proxy."""
    listen = tuple(listen)
    if setting.strip():
        upstream = parse_endpoint(setting)
        if upstream in listen:
            raise ValueError(f"{upstream} is where the proxy itself listens: queries would loop")
        if redirect and _loopback(upstream.host):
            raise ValueError(f"{upstream} is a resolver on this host: with SLUICE_DNS_REDIRECT "
                             "its own upstream queries come back to the proxy (a loop); name "
                             "the resolver it forwards to")
        return upstream
    default = default_upstream(resolv_conf, listen, redirect=redirect,
                               resolved_conf=resolved_conf)
    if default is not None:
        return default
    if redirect and any(_loopback(h) for h in nameservers(resolv_conf)):
        raise ValueError(f"empty, and /etc/resolv.conf names only resolvers on this host, "
                         f"whose upstream queries the redirect sends back to the proxy; "
                         f"{RESOLVED_UPSTREAMS} names no other (no systemd-resolved?): set "
                         "it to the resolver to forward to")
    raise ValueError("empty, and /etc/resolv.conf names no nameserver other than this proxy; "
                     "set it to the resolver to forward to")
