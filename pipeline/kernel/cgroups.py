"""cgroup v2 ids (what the hooks record) to paths (what /proc/<pid>/cgroup shows).

A cgroup's id is its cgroupfs inode number; open_by_handle_at opens it from that id alone
(a kernfs file handle), and the opened directory's path under the cgroup2 mount is the
cgroup's path. Each id is looked up once and remembered (bounded); a cgroup already removed
when its first record arrives has no path any more and is recorded as "".
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections import OrderedDict
from pathlib import Path

FILEID_KERNFS = 0xFE
CAPACITY = 4096


class CgroupPaths:
    """id -> path relative to the cgroup2 root mounted at `root` ("/" for the root)."""

    def __init__(self, root: Path, capacity: int = CAPACITY) -> None:
        self.root = str(root).rstrip("/")
        self.capacity = capacity
        self.known: OrderedDict[int, str] = OrderedDict()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def path(self, cgroup_id: int) -> str:
        found = self.known.get(cgroup_id)
        if found is None:
            found = self._resolve(cgroup_id)
            self.known[cgroup_id] = found
            if len(self.known) > self.capacity:
                self.known.popitem(last=False)
        return found

    def _resolve(self, cgroup_id: int) -> str:
        handle = ctypes.create_string_buffer(struct.pack("<IiQ", 8, FILEID_KERNFS, cgroup_id))
        fd = self.libc.open_by_handle_at(self.mount_fd, handle, os.O_RDONLY | os.O_DIRECTORY)
        if fd < 0:
            return ""  # removed already, or not under this mount
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""
        finally:
            os.close(fd)
        if where == self.root:
            return "/"
        return where[len(self.root):] if where.startswith(self.root + "/") else ""

    def close(self) -> None:
        os.close(self.mount_fd)
