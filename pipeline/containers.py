"""Which container a process belongs to, from its cgroup v2 path. Pure.

Docker and Podman name a container's cgroup after its 64-hex id: `docker-<id>.scope` or
`libpod-<id>.scope` under systemd, `/docker/<id>` with the cgroupfs driver, and containerd,
CRI-O and kind nest theirs the same way (`cri-containerd-<id>.scope` inside a kind node's
own container). The innermost id is the container the process runs in.
"""

from __future__ import annotations

import functools
import re

_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")


@functools.lru_cache(maxsize=4096)  # a host's processes live in few cgroups; asked per event
def container_of(cgroup: str) -> str:
    """The innermost 64-hex container id in a cgroup path; "" when there is none."""
    found = _ID.findall(cgroup)
    return found[-1] if found else ""
