"""Listen and upstream addresses of the proxy, and the upstream resolv.conf implies."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

DNS_PORT = 53


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


def default_upstream(resolv_conf: str, listen: Iterable[Endpoint]) -> Endpoint | None:
    """The first resolv.conf nameserver that is not this proxy (which would loop)."""
    ours = set(listen)
    for host in nameservers(resolv_conf):
        candidate = Endpoint(host, DNS_PORT)
        if candidate not in ours:
            return candidate
    return None


def choose_upstream(setting: str, resolv_conf: str, listen: Iterable[Endpoint]) -> Endpoint:
    """SLUICE_DNS_UPSTREAM, else the resolv.conf default; ValueError when there is none or
    when it is the proxy itself."""
    listen = tuple(listen)
    if setting.strip():
        upstream = parse_endpoint(setting)
        if upstream in listen:
            raise ValueError(f"{upstream} is where the proxy itself listens: queries would loop")
        return upstream
    default = default_upstream(resolv_conf, listen)
    if default is None:
        raise ValueError("empty, and /etc/resolv.conf names no nameserver other than this proxy; "
                         "set it to the resolver to forward to")
    return default
