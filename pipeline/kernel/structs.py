"""ctypes mirrors of bpf/sluice.h (tests/unit/test_layout.py compiles the header and compares)."""

from __future__ import annotations

import ctypes

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
COMM_LEN = 16
DNS_MARK = 0x2D53  # SLUICE_DNS_MARK: sockets the DNS redirect lets through (the proxy's own)

# Per-CPU counter indexes (SLUICE_CNT_*), by the name capture reports them under.
KERNEL_COUNTERS = ("packets", "allowed", "denied", "events", "aggregated", "ringbuf_full",
                   "malformed", "parked", "lost", "dns_redirected", "dns_refused",
                   "tail_taken")
COUNTER_SLOTS = 16


class Config(ctypes.Structure):
    _fields_ = [("default_action", u8), ("audit_mode", u8), ("pad", u16), ("generation", u32)]


class LpmV4(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 4)]


class LpmV6(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 16)]


class CidrValue(ctypes.Structure):
    _fields_ = [("action", u8), ("port_specific", u8), ("pad", u16)]


class PortLpmV4(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("proto", u8), ("pad", u8), ("port", u16), ("addr", u8 * 4)]


class PortLpmV6(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("proto", u8), ("pad", u8), ("port", u16), ("addr", u8 * 16)]


class PortValue(ctypes.Structure):
    _fields_ = [("action", u8), ("pad", u8 * 3)]


class SockOwner(ctypes.Structure):
    _fields_ = [("tgid", u32), ("comm", ctypes.c_char * COMM_LEN), ("pad", u32),
                ("cgroup_id", u64)]


class FlowTuple(ctypes.Structure):
    _fields_ = [("ip_version", u8), ("ip_proto", u8), ("src_port", u16), ("dst_port", u16),
                ("pad", u16), ("dst", u8 * 16)]


class DnsRedirect(ctypes.Structure):
    _fields_ = [("enabled", u8), ("has_v6", u8), ("port", u16), ("addr4", u8 * 4),
                ("addr6", u8 * 16)]


class DnsOrigin(ctypes.Structure):
    _fields_ = [("ip_version", u8), ("pad", u8), ("port", u16), ("addr", u8 * 16)]


class Event(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("ip_version", u8), ("allowed", u8), ("ip_proto", u8), ("flags", u8),
        ("src_ip", u32), ("dst_ip", u32), ("src_port", u16), ("dst_port", u16),
        ("src_ip6", u8 * 16), ("dst_ip6", u8 * 16), ("timestamp", u64), ("pid", u32),
        ("packets", u32), ("comm", ctypes.c_char * COMM_LEN), ("cgroup_id", u64),
    ]


class FlowKey(ctypes.Structure):
    _fields_ = [("ip_version", u8), ("ip_proto", u8), ("allowed", u8), ("flags", u8),
                ("src_port", u16), ("dst_port", u16), ("dst", u8 * 16)]


class FlowState(ctypes.Structure):
    _fields_ = [("last_emit", u64), ("pending", u64), ("last", Event)]


class ParkKey(ctypes.Structure):
    _fields_ = [("flow", FlowKey), ("cpu", u32), ("pad", u32), ("time", u64)]


# struct name in sluice.h -> mirror, for the layout test.
MIRRORS = {
    "sluice_event": Event, "sluice_config": Config, "sluice_lpm_v4": LpmV4,
    "sluice_lpm_v6": LpmV6, "sluice_cidr_value": CidrValue, "sluice_port_lpm_v4": PortLpmV4,
    "sluice_port_lpm_v6": PortLpmV6, "sluice_port_value": PortValue,
    "sluice_sock_owner": SockOwner, "sluice_flow_key": FlowKey, "sluice_flow_state": FlowState,
    "sluice_park_key": ParkKey,
    "sluice_flow_tuple": FlowTuple, "sluice_dns_redirect": DnsRedirect,
    "sluice_dns_origin": DnsOrigin,
}
