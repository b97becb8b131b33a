"""map_config as userspace reads it: the maps' mode, default action and generation.

The policy stage bumps map_config.generation every time it has programmed the maps; capture
attaches the classifier once it is not 0, and the dns stage remembers which answers the
policy stage confirmed open at a generation (pipeline/dns/confirmed.py).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from collections.abc import Callable

from ..errors import KernelError
from . import libbpf
from .maps import PinnedMaps
from .structs import Config

PIN_CHECK_S = 1.0   # how soon maps pinned anew (after a detach) are followed
_KEY = ctypes.c_uint32(0)


def read_config(fd: int, into: Config | None = None) -> Config | None:
    """map_config's one entry (read into `into` when given, a buffer kept by a caller that
    reads it often), None when it cannot be read."""
    config = Config() if into is None else into
    return config if libbpf.lookup(fd, _KEY, config) else None


def programmed(fd: int) -> bool:
    """Whether the policy stage has programmed the maps (generation is not 0)."""
    config = read_config(fd)
    return config is not None and config.generation != 0


class PinnedGeneration:
    """map_config.generation of this instance's pinned maps, with the pin's inode, so that
    maps pinned anew never pass for the old ones even at an equal generation. None while
    there is no pin (capture not started, or detached), it cannot be opened, or the maps are
    not programmed yet (generation 0). The pin is looked at again every check_every s of
    clock (monotonic seconds)."""

    def __init__(self, bpf_dir: Path, check_every: float = PIN_CHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = bpf_dir / "map_config"
        self.check_every, self.clock = check_every, clock
        self.maps: PinnedMaps | None = None
        self.inode = 0
        self.next_check = float("-inf")
        self.config = Config()

    def read(self) -> tuple[int, int] | None:
        now = self.clock()
        if now >= self.next_check:
            self.next_check = now + self.check_every
            self._follow_pin()
        # One lookup per DNS answer: into a buffer kept for it, not a new struct each time.
        config = (read_config(self.maps.fds["map_config"], self.config)
                  if self.maps is not None else None)
        return (self.inode, config.generation) if config and config.generation else None

    def _follow_pin(self) -> None:
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            inode = 0
        if inode == self.inode:
            return
        self.close()
        try:
            self.maps = PinnedMaps(self.path.parent, ("map_config",)) if inode else None
            self.inode = inode
        except KernelError:
            pass  # gone again, or no libbpf: no generation, so every answer asks

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()
        self.maps, self.inode = None, 0
