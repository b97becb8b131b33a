"""Port lists and protocols: overlap, union, coverage and map expansion (reference §3.8, §4.2)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .verdict import PortSpec

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

PROTOCOL_NUMBERS = {"icmp": IPPROTO_ICMP, "tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}

# One map entry of a rule: (port, L4 protocol number). ICMP entries use port 0.
PortKey = tuple[int, int]


def protocols_overlap(a: str, b: str) -> bool:
    return a == "all" or b == "all" or a == b


def union_ports(a: Sequence[PortSpec], b: Sequence[PortSpec]) -> tuple[PortSpec, ...]:
    """Either side empty means all ports, so the union is all ports too."""
    if not a or not b:
        return ()
    return tuple(dict.fromkeys((*a, *b)))


def ports_cover(ports: Sequence[PortSpec], port: int, protocol: str | None) -> bool:
    """Whether a rule's port list admits port/protocol; protocol None is an unknown L4
    protocol, which only an all-ports list admits (fail closed)."""
    if not ports:
        return True
    if protocol is None:
        return False
    return any(spec.port == port and protocols_overlap(spec.protocol, protocol) for spec in ports)


def ports_cover_all(ports: Sequence[PortSpec], wanted: Iterable[PortSpec]) -> bool:
    """Whether every wanted entry is named by ports (an all-ports list names everything)."""
    return all(ports_cover(ports, spec.port, spec.protocol) for spec in wanted)


def expand_ports(ports: Sequence[PortSpec]) -> list[PortKey]:
    """The map entries a port list becomes; `all p` opens ICMP too, as cargowall does."""
    keys: list[PortKey] = []
    for spec in ports:
        if spec.protocol == "icmp":
            keys.append((0, IPPROTO_ICMP))
        elif spec.protocol in ("tcp", "udp"):
            keys.append((spec.port, PROTOCOL_NUMBERS[spec.protocol]))
        elif spec.protocol == "all":
            keys.extend(((0, IPPROTO_ICMP), (spec.port, IPPROTO_TCP), (spec.port, IPPROTO_UDP)))
    return list(dict.fromkeys(keys))


def format_port(spec: PortSpec) -> str:
    return "icmp" if spec.protocol == "icmp" else f"{spec.port}/{spec.protocol}"


def format_ports(ports: Sequence[PortSpec]) -> str:
    return ", ".join(format_port(spec) for spec in ports) if ports else "all ports"


def ports_json(ports: Sequence[PortSpec]) -> list[dict[str, object]]:
    return [{"port": spec.port, "protocol": spec.protocol} for spec in ports]


def without_denied(allow: Sequence[PortSpec],
                   deny: Sequence[PortSpec]) -> tuple[PortSpec, ...] | None:
    """The allow side of a mixed verdict minus what its deny side names. Under a default
    deny the deny side writes nothing, so without this an `all 443` allow would open the
    `udp 443` the same verdict denies (as cargowall does). None when nothing is left. An
    all-ports allow stays all ports: the maps cannot say "all but", so a port-specific deny
    beside it is inert, as in cargowall."""
    if not allow:
        return ()
    if not deny:
        return None  # a deny side without ports denies every port
    kept: list[PortSpec] = []
    for spec in allow:
        parts = [(spec.port, spec.protocol)]
        if spec.protocol == "all":
            parts = [(spec.port, "tcp"), (spec.port, "udp"), (0, "icmp")]
        left = [(port, proto) for port, proto in parts if not ports_cover(deny, port, proto)]
        if len(left) == len(parts):
            kept.append(spec)
        else:
            kept.extend(PortSpec(port, proto) for port, proto in left)
    return tuple(kept) or None
