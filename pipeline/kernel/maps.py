"""The one adapter through which userspace writes the pinned firewall maps.

KernelRuleMaps implements pipeline.rulemaps.RuleMaps on the maps capture pinned under
SLUICE_BPF_DIR; DictRuleMaps (pipeline/rulemaps.py) is its twin for tests. Keys are built
here and only here: addresses as network-order bytes, ports host order, pads zero. Also the
kernel's counters, and the claim of a quiet flow's tail (claim_tail).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

from . import libbpf
from .ringbuf import unread_records
from .structs import (COUNTER_SLOTS, KERNEL_COUNTERS, CidrValue, Config, Event, FlowKey,
                      FlowState, LpmV4, LpmV6, ParkKey, PortLpmV4, PortLpmV6, PortValue)
from ..errors import KernelError
from ..rulemaps import Network

RULE_MAPS = ("map_config", "map_cidrs", "map_cidrs_v6", "map_ports", "map_ports_v6")
PORT_KEY_BITS = 32  # proto + pad + port precede the address in port keys


def pins_present(bpf_dir: Path) -> bool:
    return all((bpf_dir / name).exists() for name in RULE_MAPS)


class PinnedMaps:
    """Open file descriptors of this instance's pinned maps."""

    def __init__(self, bpf_dir: Path, names: tuple[str, ...]) -> None:
        self.fds: dict[str, int] = {}
        try:
            for name in names:
                self.fds[name] = libbpf.obj_get(str(bpf_dir / name))
        except FileNotFoundError as err:
            self.close()
            raise KernelError(f"{err.strerror}: is capture running with "
                              f"SLUICE_BPF_DIR={bpf_dir}?") from None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _cidr_key(network: Network):
    key = LpmV4() if network.version == 4 else LpmV6()
    key.prefixlen = network.prefixlen
    ctypes.memmove(key.addr, network.network_address.packed, len(key.addr))
    return key


def _port_key(network: Network, port: int, proto: int):
    key = PortLpmV4() if network.version == 4 else PortLpmV6()
    key.prefixlen = PORT_KEY_BITS + network.prefixlen
    key.proto, key.port = proto, port
    ctypes.memmove(key.addr, network.network_address.packed, len(key.addr))
    return key


def _network(key) -> Network:
    packed = bytes(key.addr)
    bits = key.prefixlen - (PORT_KEY_BITS if hasattr(key, "port") else 0)
    return ipaddress.ip_network((packed, bits))


class KernelRuleMaps(PinnedMaps):
    """RuleMaps on the real pinned BPF maps."""

    def __init__(self, bpf_dir: Path) -> None:
        super().__init__(bpf_dir, RULE_MAPS)

    def _fd(self, name: str, network: Network) -> int:
        return self.fds[name if network.version == 4 else f"{name}_v6"]

    def set_config(self, default_action: int, audit_mode: bool, generation: int) -> None:
        value = Config(default_action=default_action, audit_mode=int(audit_mode),
                       generation=generation)
        libbpf.update(self.fds["map_config"], ctypes.c_uint32(0), value)

    def get_config(self) -> tuple[int, bool, int]:
        value = Config()
        libbpf.lookup(self.fds["map_config"], ctypes.c_uint32(0), value)
        return value.default_action, bool(value.audit_mode), value.generation

    def put_cidr(self, network: Network, action: int, port_specific: bool) -> None:
        libbpf.update(self._fd("map_cidrs", network), _cidr_key(network),
                      CidrValue(action=action, port_specific=int(port_specific)))

    def get_cidr(self, network: Network) -> tuple[int, bool] | None:
        value = CidrValue()
        if not libbpf.lookup(self._fd("map_cidrs", network), _cidr_key(network), value):
            return None
        return value.action, bool(value.port_specific)

    def delete_cidr(self, network: Network) -> None:
        libbpf.delete(self._fd("map_cidrs", network), _cidr_key(network))

    def cidrs(self) -> Iterator[tuple[Network, int, bool]]:
        for name, key_type in (("map_cidrs", LpmV4), ("map_cidrs_v6", LpmV6)):
            for key in libbpf.keys(self.fds[name], key_type):
                value = CidrValue()
                if libbpf.lookup(self.fds[name], key, value):
                    yield _network(key), value.action, bool(value.port_specific)

    def put_port(self, network: Network, port: int, proto: int, action: int) -> None:
        libbpf.update(self._fd("map_ports", network), _port_key(network, port, proto),
                      PortValue(action=action))

    def delete_port(self, network: Network, port: int, proto: int) -> None:
        libbpf.delete(self._fd("map_ports", network), _port_key(network, port, proto))

    def ports(self) -> Iterator[tuple[Network, int, int, int]]:
        for name, key_type in (("map_ports", PortLpmV4), ("map_ports_v6", PortLpmV6)):
            for key in libbpf.keys(self.fds[name], key_type):
                value = PortValue()
                if libbpf.lookup(self.fds[name], key, value):
                    yield _network(key), key.port, key.proto, value.action


def read_counters(fd: int) -> dict[str, int]:
    """Sum the per-CPU counters of map_counters."""
    return {name: read_counter(fd, name) for name in KERNEL_COUNTERS[:COUNTER_SLOTS]}


def read_counter(fd: int, name: str) -> int:
    """One counter of map_counters, summed over the CPUs."""
    values = (ctypes.c_uint64 * libbpf.possible_cpus())()
    libbpf.lookup(fd, ctypes.c_uint32(KERNEL_COUNTERS.index(name)), values)
    return sum(values)


# sluice_claim_tail's test packet: the flow's key after an Ethernet header's room, and room for
# the flow's last record, which the program writes over the key.
_CLAIM_AT = 14
_CLAIM_PACKET = _CLAIM_AT + max(ctypes.sizeof(FlowKey), ctypes.sizeof(Event))


def claim_tail(claim_fd: int, key: bytes) -> tuple[int, Event | None]:
    """The packets still pending in the map_flows entry keyed by key, claimed by the kernel
    (sluice_claim_tail, run once): the count, exchanged for 0 as the classifier exchanges
    it, and the flow's last record as the template for reporting them; (0, None) when there
    is nothing to claim. OSError when the kernel refuses the run."""
    packet = (bytes(_CLAIM_AT) + key).ljust(_CLAIM_PACKET, b"\0")
    claimed, out = libbpf.run_program(claim_fd, packet)
    if not claimed:
        return 0, None
    return claimed, Event.from_buffer_copy(out, _CLAIM_AT)


EVIDENCE_MAPS = ("map_events", "map_parked", "map_flows")


def unreported(bpf_dir: Path) -> str:
    """What this instance's pinned maps hold that no capture has journaled, as one phrase:
    records in the ring buffer, parked records and packets pending in flows (the classifier
    keeps enforcing in enforce mode after capture stops). "" when they hold nothing or are
    not there. Reads only: a capture still running takes them as usual."""
    try:
        maps = PinnedMaps(bpf_dir, EVIDENCE_MAPS)
    except KernelError:
        return ""
    try:
        ring = unread_records(maps.fds["map_events"], ctypes.sizeof(Event))
        parked = [FlowState.from_buffer_copy(v).pending for _, v in
                  libbpf.entries(maps.fds["map_parked"], ParkKey, FlowState)]
        pending = [p for p in (FlowState.from_buffer_copy(v).pending for _, v in
                               libbpf.entries(maps.fds["map_flows"], FlowKey, FlowState)) if p]
    except OSError:
        return ""
    finally:
        maps.close()
    parts = [text for count, text in (
        (ring, f"{ring} record(s) in the ring buffer"),
        (len(parked), f"{len(parked)} parked record(s) ({sum(parked)} packet(s))"),
        (len(pending), f"{sum(pending)} packet(s) pending in {len(pending)} flow(s)")) if count]
    return ", ".join(parts)
