"""The kernel's ring-buffer record (bpf/sluice.h struct sluice_event), decoded.

BpfBlockedEvent keeps the seed's name and field meanings: IPv4 addresses are host-order
integers, IPv6 addresses network-order bytes, ports host order. sluice appends the packet
count of an aggregated flow and the owner's process name (80 bytes in all).
"""

from __future__ import annotations

import dataclasses
import struct

from .addresses import ipv4_text, ipv6_text
from .events import RawEvent

RECORD = struct.Struct("<BBBBIIHH16s16sQII16s")
RECORD_SIZE = RECORD.size  # 80


class ShortRecord(ValueError):
    """A ring-buffer record shorter than struct sluice_event (counted and skipped)."""


@dataclasses.dataclass(slots=True)
class BpfBlockedEvent:
    ip_version: int
    allowed: int
    ip_proto: int
    flags: int
    src_ip: int
    dst_ip: int
    src_port: int
    dst_port: int
    src_ip6: bytes
    dst_ip6: bytes
    timestamp: int  # bpf_ktime_get_ns(), monotonic
    pid: int
    packets: int
    comm: bytes

    @classmethod
    def unpack(cls, data: bytes) -> "BpfBlockedEvent":
        if len(data) < RECORD_SIZE:
            raise ShortRecord(f"kernel record of {len(data)} bytes, expected {RECORD_SIZE}")
        return cls(*RECORD.unpack_from(data))

    def pack(self) -> bytes:
        return RECORD.pack(*dataclasses.astuple(self))

    def to_raw(self, mono_to_wall_ns: int) -> RawEvent:
        """Decode addresses and name; mono_to_wall_ns converts the kernel's monotonic time."""
        if self.ip_version == 6:
            src, dst = ipv6_text(self.src_ip6), ipv6_text(self.dst_ip6)
        else:  # cargowall treats anything but 6 as IPv4
            src, dst = ipv4_text(self.src_ip), ipv4_text(self.dst_ip)
        comm = self.comm.split(b"\0", 1)[0].decode("utf-8", "replace")
        return RawEvent(
            6 if self.ip_version == 6 else 4, bool(self.allowed), self.ip_proto, self.flags,
            src, dst, self.src_port, self.dst_port, self.timestamp + mono_to_wall_ns,
            self.pid, comm, max(self.packets, 1),
        )


def decode_record(data: bytes, mono_to_wall_ns: int) -> RawEvent:
    return BpfBlockedEvent.unpack(data).to_raw(mono_to_wall_ns)
