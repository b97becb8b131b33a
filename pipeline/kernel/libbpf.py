"""Thin ctypes bindings to the system libbpf (libbpf1, a dependency of python3-bpfcc).

Only what userspace needs without loading programs: open pinned maps, read and write them,
and find or detach attached programs. Programs are compiled and loaded by bcc in capture.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from functools import lru_cache

from ..errors import KernelError


class TcHook(ctypes.Structure):
    """libbpf's struct bpf_tc_hook."""
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int),
                ("attach_point", ctypes.c_int), ("parent", ctypes.c_uint32)]


class TcOpts(ctypes.Structure):
    """libbpf's struct bpf_tc_opts."""
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32),
                ("priority", ctypes.c_uint32)]


class TestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (the fields up to flags)."""
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
                ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


BPF_TC_INGRESS, BPF_TC_EGRESS = 1, 2
BPF_TC_F_REPLACE = 1


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        handle = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise KernelError("libbpf is missing: install libbpf1 (./bootstrap does)") from None
    vp, u32, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
    signatures = {
        "bpf_obj_get": ([ctypes.c_char_p], i32),
        "bpf_map_update_elem": ([i32, vp, vp, ctypes.c_uint64], i32),
        "bpf_map_lookup_elem": ([i32, vp, vp], i32),
        "bpf_map_delete_elem": ([i32, vp], i32),
        "bpf_map_get_next_key": ([i32, vp, vp], i32),
        "bpf_map_lookup_batch": ([i32, vp, vp, vp, vp, ctypes.POINTER(u32), vp], i32),
        "bpf_map_lookup_and_delete_batch": ([i32, vp, vp, vp, vp, ctypes.POINTER(u32), vp], i32),
        "bpf_prog_get_fd_by_id": ([u32], i32),
        "bpf_prog_detach2": ([i32, i32, i32], i32),
        "bpf_prog_attach": ([i32, i32, i32, u32], i32),
        "libbpf_num_possible_cpus": ([], i32),
        "bpf_obj_get_info_by_fd": ([i32, vp, ctypes.POINTER(u32)], i32),
        "bpf_prog_test_run_opts": ([i32, ctypes.POINTER(TestRunOpts)], i32),
    }
    hook, opts = ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)
    signatures.update({
        "bpf_tc_hook_create": ([hook], i32), "bpf_tc_hook_destroy": ([hook], i32),
        "bpf_tc_attach": ([hook, opts], i32), "bpf_tc_detach": ([hook, opts], i32),
    })
    for fn, (args, res) in signatures.items():
        getattr(handle, fn).argtypes = args
        getattr(handle, fn).restype = res
    # libbpf prints its own warnings to stderr (a detach of a filter that is not there, for
    # one); every call here reports through its return code instead.
    handle.libbpf_set_print.argtypes = [vp]
    handle.libbpf_set_print.restype = vp
    handle.libbpf_set_print(None)
    return handle


def _errno(rc: int) -> int:
    return -rc if rc < 0 else ctypes.get_errno()


def obj_get(path: str) -> int:
    fd = lib().bpf_obj_get(path.encode())
    if fd < 0:
        err = _errno(fd)
        raise FileNotFoundError(err, f"cannot open pinned object {path}: {os.strerror(err)}")
    return fd


def update(fd: int, key: ctypes.Structure | ctypes._SimpleCData, value) -> None:
    rc = lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0)
    if rc < 0:
        err = _errno(rc)
        raise OSError(err, f"map update failed: {os.strerror(err)}")


def lookup(fd: int, key, value) -> bool:
    """Fill value for key; False when the key is absent."""
    rc = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    return rc == 0


def delete(fd: int, key) -> bool:
    return lib().bpf_map_delete_elem(fd, ctypes.byref(key)) == 0


def run_program(prog_fd: int, packet: bytes, repeat: int = 1) -> tuple[int, bytes]:
    """Run a loaded tc program on packet (BPF_PROG_TEST_RUN, never on the wire), repeat
    times: its last return value and the packet as it left it."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet))
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.addressof(data_in),
                       data_out=ctypes.addressof(data_out), data_size_in=len(packet),
                       data_size_out=len(packet), repeat=repeat)
    rc = lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc < 0:
        err = _errno(rc)
        raise OSError(err, f"program test run failed: {os.strerror(err)}")
    return opts.retval, data_out.raw[:opts.data_size_out]


def keys(fd: int, key_type):
    """Every key of a map (a snapshot; entries may change meanwhile)."""
    found = []
    current, following = None, key_type()
    while lib().bpf_map_get_next_key(fd, None if current is None else ctypes.byref(current),
                                     ctypes.byref(following)) == 0:
        found.append(following)
        current, following = following, key_type()
    return found


BATCH_ENTRIES = 4096  # entries per batch call: a hash bucket never holds this many


def chunks(fd: int, key_type, value_type, *, delete: bool = False,
           chunk: int = BATCH_ENTRIES) -> Iterator[tuple[bytes, bytes, int]]:
    """Every entry of a hash map, as (keys, values, count): count keys and values laid end
    to end, read a chunk per system call (Linux 5.6+); with delete, each bucket is read and
    emptied in one step, so nothing added meanwhile is lost. Walking a map key by key costs
    two calls an entry, and capture sweeps maps of 65,536 entries (capture.py: Paces)."""
    call = lib().bpf_map_lookup_and_delete_batch if delete else lib().bpf_map_lookup_batch
    key_size, value_size = ctypes.sizeof(key_type), ctypes.sizeof(value_type)
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    # For hash maps the position between calls is a bucket number (4 bytes).
    position, following = ctypes.c_uint64(), ctypes.c_uint64()
    start = None
    while True:
        count = ctypes.c_uint32(chunk)
        rc = call(fd, start, ctypes.byref(following), keys, values, ctypes.byref(count), None)
        if rc < 0 and _errno(rc) != errno.ENOENT:  # ENOENT: the last chunk, maybe empty
            err = _errno(rc)
            raise OSError(err, f"batch map read failed: {os.strerror(err)}")
        yield (ctypes.string_at(keys, count.value * key_size),
               ctypes.string_at(values, count.value * value_size), count.value)
        if rc < 0:
            return
        position.value = following.value
        start = ctypes.byref(position)


def entries(fd: int, key_type, value_type, *, delete: bool = False,
            chunk: int = BATCH_ENTRIES) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map as bytes (chunks, entry by entry)."""
    key_size, value_size = ctypes.sizeof(key_type), ctypes.sizeof(value_type)
    for keys, values, count in chunks(fd, key_type, value_type, delete=delete, chunk=chunk):
        for i in range(count):
            yield (keys[i * key_size:(i + 1) * key_size],
                   values[i * value_size:(i + 1) * value_size])


def possible_cpus() -> int:
    return lib().libbpf_num_possible_cpus()


def prog_fd_by_id(prog_id: int) -> int:
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        raise ProcessLookupError(f"no BPF program with id {prog_id}")
    return fd


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int) -> None:
    rc = lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags)
    if rc < 0:
        err = _errno(rc)
        raise OSError(err, os.strerror(err))


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> bool:
    return lib().bpf_prog_detach2(prog_fd, target_fd, attach_type) == 0


def max_entries(map_fd: int) -> int:
    """A map's max_entries as the kernel made it (struct bpf_map_info, at offset 16): for a
    ring buffer, its size in bytes."""
    info = (ctypes.c_uint32 * 64)()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if lib().bpf_obj_get_info_by_fd(map_fd, info, ctypes.byref(size)) < 0:
        raise OSError(ctypes.get_errno(), "cannot read map info")
    return info[4]


def prog_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (struct bpf_prog_info.id, at offset 4)."""
    info = (ctypes.c_uint32 * 64)()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if lib().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)) < 0:
        raise OSError(ctypes.get_errno(), "cannot read program info")
    return info[1]


# ---------------------------------------------------------------- tc (clsact) filters

def _hook(ifindex: int, points: int = BPF_TC_EGRESS) -> TcHook:
    return TcHook(sz=ctypes.sizeof(TcHook), ifindex=ifindex, attach_point=points)


def tc_hook_create(ifindex: int) -> bool:
    """Add the clsact qdisc; False when it was there already (then it is not ours)."""
    rc = lib().bpf_tc_hook_create(ctypes.byref(_hook(ifindex)))
    if rc == -errno.EEXIST:
        return False
    if rc < 0:
        raise OSError(-rc, f"cannot add clsact: {os.strerror(-rc)}")
    return True


def tc_attach(ifindex: int, prog_fd: int, handle: int, priority: int) -> None:
    """Put prog_fd on egress in direct-action mode (libbpf always uses it), replacing ours."""
    opts = TcOpts(sz=ctypes.sizeof(TcOpts), prog_fd=prog_fd, flags=BPF_TC_F_REPLACE,
                  handle=handle, priority=priority)
    rc = lib().bpf_tc_attach(ctypes.byref(_hook(ifindex)), ctypes.byref(opts))
    if rc < 0:
        raise OSError(-rc, f"cannot attach the egress filter: {os.strerror(-rc)}")


def tc_detach(ifindex: int, handle: int, priority: int) -> bool:
    opts = TcOpts(sz=ctypes.sizeof(TcOpts), handle=handle, priority=priority)
    return lib().bpf_tc_detach(ctypes.byref(_hook(ifindex)), ctypes.byref(opts)) == 0


def tc_hook_destroy(ifindex: int) -> bool:
    """Remove the clsact qdisc (ingress and egress) and whatever is on it."""
    hook = _hook(ifindex, BPF_TC_INGRESS | BPF_TC_EGRESS)
    return lib().bpf_tc_hook_destroy(ctypes.byref(hook)) == 0
