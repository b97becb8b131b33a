"""Raw file descriptors and timers, served by the shared stage loop beside its ZeroMQ sockets.

The loop (pipeline/loop.py) gives every stage one Reactor as `io.reactor`: descriptors
registered here sit in one epoll selector whose own descriptor the loop polls with the
sockets, and timers are a heap the loop runs on every turn (its poll never sleeps past the
next one). Time comes from the clock the stage was built with, so a test can move it.
One thread, no locks: callbacks run on the loop's thread.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import selectors
import time
from typing import Any
from collections.abc import Callable

Clock = Callable[[], float]   # monotonic seconds
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


@dataclasses.dataclass(slots=True)
class Timer:
    when: float
    action: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    """An epoll selector whose callbacks take the ready mask, and deadlines on a heap (a
    cancelled timer stays until due and is skipped then)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.heap: list[tuple[float, int, Timer]] = []
        self.order = itertools.count()

    def fileno(self) -> int:
        return self.selector.fileno()

    def register(self, fileobj: Any, events: int, callback: Callable[[int], None]) -> None:
        self.selector.register(fileobj, events, callback)

    def modify(self, fileobj: Any, events: int, callback: Callable[[int], None]) -> None:
        self.selector.modify(fileobj, events, callback)

    def unregister(self, fileobj: Any) -> None:
        self.selector.unregister(fileobj)

    def registered(self) -> int:
        return len(self.selector.get_map())

    def after(self, delay: float, action: Callable[[], None]) -> Timer:
        timer = Timer(self.clock() + delay, action)
        heapq.heappush(self.heap, (timer.when, next(self.order), timer))
        return timer

    def run_ready(self) -> None:
        """Call back every registered descriptor that is ready now (never waits)."""
        for key, mask in self.selector.select(0):
            key.data(mask)

    def run_due(self) -> None:
        now = self.clock()
        while self.heap and self.heap[0][0] <= now:
            timer = heapq.heappop(self.heap)[2]
            if not timer.cancelled:
                timer.action()

    def next_due_in(self) -> float | None:
        """Seconds until the earliest live timer (0 when overdue), None without one."""
        while self.heap and self.heap[0][2].cancelled:
            heapq.heappop(self.heap)
        return max(0.0, self.heap[0][0] - self.clock()) if self.heap else None

    def close(self) -> None:
        self.selector.close()
        self.heap.clear()
