"""The layout of struct sluice_event (bpf/sluice.h): the kernel's ring-buffer record, decoded.

BpfBlockedEvent keeps the seed's name and field meanings: IPv4 addresses are host-order
integers, IPv6 addresses network-order bytes, ports host order. sluice appends the packet
count of an aggregated flow, the owner's process name and its cgroup id (88 bytes in all).
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import Callable

from ..addresses import ipv4_text, ipv6_text
from ..events import RawEvent
from ..journal import Frame, event_id as journal_event_id
from .structs import Event

RECORD = struct.Struct("<BBBBIIHH16s16sQII16sQ")
RECORD_SIZE = RECORD.size  # 88


def _no_cgroup(_cgroup_id: int) -> str:
    return ""


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
    cgroup_id: int  # the owner's cgroup v2 id, 0 if unknown

    @classmethod
    def unpack(cls, data: bytes) -> BpfBlockedEvent:
        if len(data) < RECORD_SIZE:
            raise ShortRecord(f"kernel record of {len(data)} bytes, expected {RECORD_SIZE}")
        return cls(*RECORD.unpack_from(data))

    def pack(self) -> bytes:
        return RECORD.pack(*dataclasses.astuple(self))

    def to_raw(self, mono_to_wall_ns: int,
               cgroup_path: Callable[[int], str] = _no_cgroup) -> RawEvent:
        """Decode addresses and name; mono_to_wall_ns converts the kernel's monotonic time."""
        return decode_record(self.pack(), mono_to_wall_ns, cgroup_path=cgroup_path)


def _process_name(comm: bytes) -> str:
    return comm.split(b"\0", 1)[0].decode("utf-8", "replace") if comm[0] else ""


def decode_record(data: bytes, mono_to_wall_ns: int, event_id: str = "", seq: int = 0,
                  cgroup_path: Callable[[int], str] = _no_cgroup) -> RawEvent:
    """BpfBlockedEvent.unpack(data).to_raw(...) without the intermediate object (a frame's
    records go through decode_frame). cgroup_path names a cgroup id ("" for 0)."""
    if len(data) < RECORD_SIZE:
        raise ShortRecord(f"kernel record of {len(data)} bytes, expected {RECORD_SIZE}")
    (version, allowed, proto, flags, src4, dst4, sport, dport, src6, dst6, ts, pid, packets,
     comm, cgroup_id) = RECORD.unpack_from(data)
    if version == 6:
        src, dst = ipv6_text(src6), ipv6_text(dst6)
    else:
        version, src, dst = 4, ipv4_text(src4), ipv4_text(dst4)
    return RawEvent(version, allowed == 1, proto, flags, src, dst, sport, dport,
                    ts + mono_to_wall_ns, pid, _process_name(comm), packets or 1, event_id, seq,
                    cgroup_path(cgroup_id) if cgroup_id else "")


def decode_frame(frame: Frame, journal_id: str,
                 skip_seq: Callable[[int], bool] | None = None, start: int = 0,
                 stop: int | None = None,
                 cgroup_path: Callable[[int], str] = _no_cgroup) -> list[RawEvent]:
    """Records start..stop of a journal frame, each with its journal number and event id;
    records of an older, shorter layout are zero-padded (struct sluice_event only grows at
    its end). skip_seq(seq) -> True leaves a record out (one persist already stored).
    cgroup_path names the owners' cgroup ids (a cgroup gone by then is named "")."""
    stop = frame.count if stop is None else min(stop, frame.count)
    if (not frame.first_seq or frame.record_size != RECORD_SIZE
            or frame.stride < frame.skip + RECORD_SIZE):
        return _decode_each(frame, journal_id, skip_seq, start, stop, cgroup_path)
    # A journaled frame of today's layout: every record of a flood comes this way, so its
    # slots are unpacked in one pass and what repeats from one record to the next (the
    # source address, the process name) is decoded once (half the time of _decode_each).
    stride, shift = frame.stride, frame.mono_to_wall_ns
    events = []
    seq = frame.first_seq + start
    last_src4, last_src, last_comm, last_name = -1, "", b"", ""
    for (version, allowed, proto, flags, src4, dst4, sport, dport, src6, dst6, ts, pid, packets,
         comm, cgroup_id) in _slots(stride, frame.skip).iter_unpack(
             memoryview(frame.payload)[start * stride:stop * stride]):
        if skip_seq is not None and skip_seq(seq):
            seq += 1
            continue
        if version == 6:
            src, dst = ipv6_text(src6), ipv6_text(dst6)
        else:
            if src4 != last_src4:
                last_src4, last_src = src4, ipv4_text(src4)
            version, src, dst = 4, last_src, ipv4_text(dst4)
        if comm != last_comm:
            last_comm, last_name = comm, _process_name(comm)
        events.append(RawEvent(version, allowed == 1, proto, flags, src, dst, sport, dport,
                               ts + shift, pid, last_name, packets or 1,
                               journal_event_id(journal_id, seq), seq,
                               cgroup_path(cgroup_id) if cgroup_id else ""))
        seq += 1
    return events


def _decode_each(frame: Frame, journal_id: str, skip_seq: Callable[[int], bool] | None,
                 start: int, stop: int, cgroup_path: Callable[[int], str]) -> list[RawEvent]:
    """decode_frame record by record: a frame not journaled, or of an older layout."""
    pad = b"\0" * max(0, RECORD_SIZE - frame.record_size)
    shift = frame.mono_to_wall_ns
    if not frame.first_seq:  # not journaled (the journal was full or failing)
        return [decode_record(frame.record(i) + pad, shift, cgroup_path=cgroup_path)
                for i in range(start, stop)]
    events = []
    for i in range(start, stop):
        seq = frame.first_seq + i
        if skip_seq is not None and skip_seq(seq):
            continue
        data = frame.record(i)
        if pad:
            data += pad
        events.append(decode_record(data, shift, journal_event_id(journal_id, seq), seq,
                                    cgroup_path))
    return events


@functools.cache  # a ring buffer has one slot layout: made once
def _slots(stride: int, skip: int) -> struct.Struct:
    """A ring-buffer slot: its header (skip bytes), the record, the padding to stride."""
    return struct.Struct(f"<{skip}x{RECORD.format[1:]}{stride - skip - RECORD_SIZE}x")


def reported_record(template: Event, timestamp_ns: int, packets: int) -> bytes:
    """A kernel record made from a flow's template (capture's sweeps): the packets it still
    has to report, at the given monotonic time."""
    record = Event.from_buffer_copy(template)
    record.timestamp, record.packets = timestamp_ns, packets
    return bytes(record)
