"""What the stages read from the host (resolv.conf, /proc/net, DMI), behind one seam.

Tests hand a stage their own HostFiles with the text they want it to see. This module imports
nothing of sluice, so the pure packages' I/O helpers (dns/net) and the start-up policy can
both use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path


class HostFiles:
    """What the stages read from the host (resolv.conf, /proc/net, DMI); a seam for tests."""

    def read(self, path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""
