"""Reading capture's hash maps a chunk per system call (pipeline/kernel/libbpf.py: entries)."""

from __future__ import annotations

import ctypes
import os

import pytest

from pipeline.kernel import libbpf

pytestmark = pytest.mark.kernel

HASH, LRU_HASH = 1, 9  # enum bpf_map_type
ENTRIES = 10_000


@pytest.fixture(params=[HASH, LRU_HASH], ids=["hash", "lru_hash"])
def filled(kernel, request):
    """A map of ENTRIES u32 keys, each with its own u64 value."""
    create = libbpf.lib().bpf_map_create
    create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                       ctypes.c_uint32, ctypes.c_void_p]
    create.restype = ctypes.c_int
    fd = create(request.param, b"sluice_test", 4, 8, ENTRIES * 2, None)
    assert fd >= 0, os.strerror(-fd)
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
