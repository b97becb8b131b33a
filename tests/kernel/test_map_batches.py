"""Reading capture's hash maps a chunk per system call (pipeline/kernel/libbpf.py: entries)."""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import pytest

from pipeline.kernel import libbpf
from pipeline.kernel.structs import KERNEL_COUNTERS
from pipeline.loop import StageIO
from pipeline.stages.capture import CaptureStage
from tests.support.kernelrig import create_map
from tests.support.stagekit import stage_settings

pytestmark = pytest.mark.kernel

HASH, PERCPU_ARRAY, LRU_HASH = 1, 6, 9  # enum bpf_map_type
ENTRIES = 10_000


@pytest.fixture(params=[HASH, LRU_HASH], ids=["hash", "lru_hash"])
def filled(kernel, request):
    """A map of ENTRIES u32 keys, each with its own u64 value."""
    fd = create_map(request.param, 4, 8, ENTRIES * 2)
    for i in range(ENTRIES):
        libbpf.update(fd, ctypes.c_uint32(i), ctypes.c_uint64(i * 7))
    yield fd
    os.close(fd)


def read(fd, **options) -> dict[int, int]:
    seen: dict[int, int] = {}
    for key, value in libbpf.entries(fd, ctypes.c_uint32, ctypes.c_uint64, **options):
        number = int.from_bytes(key, "little")
        assert number not in seen, f"key {number} read twice"
        seen[number] = int.from_bytes(value, "little")
    return seen


@pytest.mark.parametrize("chunk", [libbpf.BATCH_ENTRIES, 1000, 64])
def test_every_entry_is_read_once_with_its_value(filled, chunk):
    assert read(filled, chunk=chunk) == {i: i * 7 for i in range(ENTRIES)}
    assert len(libbpf.keys(filled, ctypes.c_uint32)) == ENTRIES  # reading leaves them


def test_a_read_with_delete_takes_every_entry_and_leaves_the_map_empty(filled):
    assert read(filled, delete=True, chunk=1000) == {i: i * 7 for i in range(ENTRIES)}
    assert libbpf.keys(filled, ctypes.c_uint32) == []
    assert read(filled) == {}


QUEUE = 22  # a map type without batch reads: any read of it fails


@pytest.fixture
def unreadable(kernel):
    fd = create_map(QUEUE, 0, 8, 16)
    yield fd
    os.close(fd)


def test_a_map_that_cannot_be_read_is_an_os_error(unreadable):
    with pytest.raises(OSError, match="batch map read failed"):
        read(unreadable)


def test_capture_counts_a_failed_sweep_logs_it_once_and_goes_on(unreadable, tmp_path, caplog):
    stage = CaptureStage()
    stage.io = StageIO("capture", stage_settings(tmp_path), None, threading.Event(),
                       logging.getLogger("sluice.capture.under-test"))
    stage.flows_fd = stage.overflow_fd = unreadable
    stage.counters_fd = create_map(PERCPU_ARRAY, 4, 8, 16)
    # The kernel's counters say a packet is folded into some flow: every sweep reads map_flows.
    libbpf.update(stage.counters_fd, ctypes.c_uint32(KERNEL_COUNTERS.index("aggregated")),
                  (ctypes.c_uint64 * libbpf.possible_cpus())(1))
    with caplog.at_level(logging.INFO, "sluice.capture.under-test"):
        for _ in range(3):
            stage._sweep_flows()
            stage._sweep_overflow()
        assert stage.io.counters.get("map_read_errors") == 6
        failures = [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()]
        assert len(failures) == 2, failures  # one line per map, not one per sweep
        assert any("map_parked" in line for line in failures)
        # A map that reads again (empty of due tails here) says so once and counts no more.
        empty = create_map(HASH, 4, 8, 16)
        try:
            stage.overflow_fd = empty
            stage._sweep_overflow()
            stage._sweep_overflow()
        finally:
            os.close(empty)
    assert stage.io.counters.get("map_read_errors") == 6
    assert [r.getMessage() for r in caplog.records].count("reading map_parked works again") == 1
    os.close(stage.counters_fd)
