"""struct sluice_event as pipeline/kernel/event_layout.py decodes it: byte orders, address text,
short records."""

import ipaddress
import socket
import struct

import pytest

from pipeline.addresses import canonical, ipv4_text, ipv6_text
from pipeline.journal import Frame, event_id
from pipeline.kernel.event_layout import (RECORD_SIZE, BpfBlockedEvent, ShortRecord, decode_frame,
                                          decode_record)


def record(**fields):
    base = dict(ip_version=4, allowed=0, ip_proto=6, flags=0, src_ip=0, dst_ip=0, src_port=0,
                dst_port=0, src_ip6=bytes(16), dst_ip6=bytes(16), timestamp=0, pid=0,
                packets=1, comm=b"", cgroup_id=0)
    base.update(fields)
    return BpfBlockedEvent(**base).pack()


def test_record_is_88_bytes_little_endian():
    data = record(src_port=0x1234)
    assert len(data) == RECORD_SIZE == 88
    assert data[12:14] == b"\x34\x12"  # host order on x86: little-endian


@pytest.mark.parametrize("text", ["93.184.216.34", "10.0.0.1", "255.255.255.255", "0.0.0.0"])
def test_ipv4_host_order_integer_prints_as_dotted_quad(text):
    # The kernel stores bpf_ntohl(daddr): the integer whose big-endian bytes are the address.
    host_order = int(ipaddress.IPv4Address(text))
    event = decode_record(record(dst_ip=host_order, src_ip=host_order), 0)
    assert event.dst_ip == event.src_ip == text


def test_network_order_bytes_misread_as_host_order_would_reverse_the_address():
    # Guard against the classic trap: the map-key form (network-order bytes read natively)
    # is not the event form.
    packed = socket.inet_aton("93.184.216.34")
    native = struct.unpack("<I", packed)[0]
    assert decode_record(record(dst_ip=native), 0).dst_ip == "34.216.184.93"


@pytest.mark.parametrize("address, text", [
    ("2001:db8::1", "2001:db8::1"), ("::ffff:10.1.2.3", "10.1.2.3"), ("::1", "::1"),
    ("fe80::1:0:0:1", "fe80::1:0:0:1"), ("2001:0:0:1::1", "2001:0:0:1::1"),
    ("::1.2.3.4", "::102:304"), ("2001:DB8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
])
def test_ipv6_text_is_go_rendering(address, text):
    packed = ipaddress.IPv6Address(address).packed
    assert ipv6_text(packed) == text
    event = decode_record(record(ip_version=6, dst_ip6=packed, src_ip6=packed), 0)
    assert (event.ip_version, event.dst_ip) == (6, text)


@pytest.mark.parametrize("version", [0, 4, 5, 255])
def test_anything_but_6_is_ipv4(version):
    assert decode_record(record(ip_version=version, dst_ip=1), 0).ip_version == 4


def test_fields_comm_and_time():
    data = record(allowed=1, ip_proto=17, flags=1, src_port=5353, dst_port=53, pid=4242,
                  packets=7, timestamp=1_000, comm=b"curl\0\0garbage")
    event = decode_record(data, mono_to_wall_ns=5_000)
    assert (event.allowed, event.ip_proto, event.flags, event.src_port, event.dst_port) == (
        True, 17, 1, 5353, 53)
    assert (event.pid, event.comm, event.packets, event.timestamp_ns) == (4242, "curl", 7, 6_000)
    assert event.mid_stream


@pytest.mark.parametrize("size", [0, 1, 63, 64, 79])
def test_short_records_are_rejected(size):
    with pytest.raises(ShortRecord):
        decode_record(record()[:size], 0)


def test_protocol_block_shape():
    gre = decode_record(record(ip_proto=47, dst_port=47), 0)
    syn = decode_record(record(ip_proto=6, src_port=40000, dst_port=443), 0)
    assert gre.is_protocol_block and not syn.is_protocol_block


@pytest.mark.parametrize("text, expected", [
    (" 10.0.0.1 ", "10.0.0.1"), ("::FFFF:1.2.3.4", "1.2.3.4"), ("2001:DB8::1", "2001:db8::1")])
def test_canonical_address_text(text, expected):
    assert canonical(text) == expected


def test_ipv4_text():
    assert ipv4_text(0x7F000001) == "127.0.0.1"


def test_the_owner_cgroup_id_becomes_its_path_and_zero_stays_unknown():
    paths = {7: "/system.slice/docker-" + "a" * 64 + ".scope"}
    assert decode_record(record(cgroup_id=7), 0, cgroup_path=paths.get).cgroup == paths[7]
    assert decode_record(record(cgroup_id=0), 0, cgroup_path=paths.get).cgroup == ""
    assert decode_record(record(cgroup_id=7), 0).cgroup == ""  # no resolver: unknown


def test_the_seeds_event_type_decodes_through_the_pipelines_decoder():
    """BpfBlockedEvent is the seed's name for this layout: unpack and to_raw are the same
    decode capture runs (decode_record), not a second one."""
    data = record(ip_version=6, allowed=1, ip_proto=17, src_ip6=bytes(15) + b"\x02",
                  dst_ip6=b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01", src_port=5353,
                  dst_port=53, timestamp=5, pid=42, packets=3, comm=b"dig", cgroup_id=7)
    event = BpfBlockedEvent.unpack(data)
    assert event.pack() == data
    cgroups = {7: "/ci.slice"}.get
    assert event.to_raw(1_000, cgroups) == decode_record(data, 1_000, cgroup_path=cgroups)
    assert event.to_raw(1_000, cgroups).dst_ip == "2001:db8::1"


def test_a_frame_of_ring_buffer_slots_decodes_as_each_record_alone():
    """decode_frame unpacks a journaled frame's slots in one pass and decodes a repeated
    source address and process name once: the records must come out as decode_record
    makes each of them, through changes of source, name, family and owner."""
    records = []
    for i in range(40):
        fields = dict(src_ip=0x0A000002 + i // 7, dst_ip=0x0B000000 + i, src_port=40000 + i,
                      dst_port=443, timestamp=1_000 + i, pid=100 + i // 5, packets=i % 3,
                      comm=[b"curl", b"python3", b"", b"\xffbad\0x"][i // 10], cgroup_id=i % 4)
        if i % 9 == 4:
            fields.update(ip_version=6, src_ip6=socket.inet_pton(socket.AF_INET6, "2001:db8::2"),
                          dst_ip6=socket.inet_pton(socket.AF_INET6, f"2001:db8::{i + 16:x}"))
        records.append(record(**fields))
    stride = 96  # as the ring buffer lays them out: an 8-byte header, then padding to 8
    payload = b"".join(struct.pack("<II", RECORD_SIZE, 0) + r + bytes(stride - 8 - RECORD_SIZE)
                       for r in records)
    frame = Frame(501, len(records), stride, 8, RECORD_SIZE, 7_000, payload)
    paths = {1: "/a.slice", 2: "/b.slice", 3: "/c.slice"}
    skipped = {505, 511, 512}

    got = decode_frame(frame, "0123456789abcdef", skipped.__contains__, 3, 37, paths.get)

    expected = [decode_record(records[i], 7_000, event_id("0123456789abcdef", 501 + i),
                              501 + i, paths.get)
                for i in range(3, 37) if 501 + i not in skipped]
    assert got == expected and len(got) == 31
