"""The classifier parks what the ring buffer refuses: run on frames through BPF_PROG_TEST_RUN,
with nobody draining the ring buffer, and map_parked read in the batches capture's sweep uses."""

from __future__ import annotations

import ctypes
import os
import struct
import time
from pathlib import Path

import pytest

from pipeline.kernel import libbpf
from pipeline.kernel.loader import AGG_WINDOW_NS, load_classifier, remove_pins
from pipeline.kernel.maps import KernelRuleMaps, read_counters
from pipeline.kernel.structs import FlowState, ParkKey
from pipeline.rulemaps import DENY
from pipeline.settings import Settings

pytestmark = pytest.mark.kernel

SOURCE, DESTINATION = bytes([10, 203, 0, 1]), bytes([10, 203, 0, 9])
TC_ACT_SHOT = 2


class RunOpts(ctypes.Structure):  # struct bpf_test_run_opts (libbpf)
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
                ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


def udp_frame(dst_port: int) -> bytes:
    """Ethernet, IPv4 and UDP headers of one datagram from port 40000 (checksums unchecked)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, SOURCE, DESTINATION)
    udp = struct.pack("!HHHH", 40000, dst_port, 8, 0)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


@pytest.fixture
def classifier(kernel, tmp_path):
    bpf_dir = Path(f"/sys/fs/bpf/sluice-park-{os.getpid()}")
    settings = Settings.from_env({"SLUICE_BPF_DIR": str(bpf_dir), "SLUICE_RINGBUF_PAGES": "1",
                                  "SLUICE_RUN_DIR": str(tmp_path / "run")})
    loaded = load_classifier(settings)
    maps = KernelRuleMaps(bpf_dir)
    try:
        maps.set_config(DENY, False, 1)  # enforce mode, default deny
        yield loaded
    finally:
        maps.close()
        loaded.cleanup()
        remove_pins(bpf_dir)  # and the directory


def send(classifier, dst_port: int) -> int:
    """The classifier's verdict on one datagram."""
    frame = udp_frame(dst_port)
    data = ctypes.create_string_buffer(frame, len(frame))
    opts = RunOpts(sz=ctypes.sizeof(RunOpts), data_in=ctypes.addressof(data),
                   data_size_in=len(frame), repeat=1)
    run = libbpf.lib().bpf_prog_test_run_opts
    run.argtypes = [ctypes.c_int, ctypes.POINTER(RunOpts)]
    rc = run(classifier.egress_fd, ctypes.byref(opts))
    assert rc == 0, os.strerror(-rc)  # libbpf returns the error negated
    return opts.retval


def parked(classifier) -> list[tuple[int, int]]:
    """(destination port, packets) of each parked record, read without taking it."""
    found = []
    for key_bytes, value_bytes in libbpf.entries(classifier.map_fd("map_parked"), ParkKey,
                                                 FlowState):
        key, value = ParkKey.from_buffer_copy(key_bytes), FlowState.from_buffer_copy(value_bytes)
        found.append((key.flow.dst_port, value.pending))
    return found


def test_a_flow_refused_twice_is_parked_as_two_whole_records(classifier):
    # Fill the one-page ring buffer with records of other flows; nobody drains it.
    for port in range(1000, 1200):
        assert send(classifier, port) == TC_ACT_SHOT
    assert parked(classifier), "the ring buffer never filled"
    assert send(classifier, 7000) == TC_ACT_SHOT
    time.sleep(AGG_WINDOW_NS / 1e9 + 0.2)  # the flow's window ends: its next packet emits
    assert send(classifier, 7000) == TC_ACT_SHOT
    assert sorted(p for p in parked(classifier) if p[0] == 7000) == [(7000, 1), (7000, 1)]
    counters = read_counters(classifier.map_fd("map_counters"))
    assert counters["parked"] == sum(packets for _, packets in parked(classifier))
    assert counters["lost"] == 0
