"""What the stages read from the host (resolv.conf, /proc/net, DMI), behind one seam.

Tests hand a stage their own HostFiles with the text they want it to see. This module imports
nothing of sluice, so the pure packages' I/O helpers (dns/net) and the start-up policy can
both use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path


def process_start(pid: int) -> str:
    """The start time of a live pid (jiffies since boot, /proc/<pid>/stat field 22), or ""
    when it is gone (a zombie counts as gone): with the pid, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else ""


class HostFiles:
    """What the stages read from the host (resolv.conf, /proc/net, DMI); a seam for tests."""

    def read(self, path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""
