"""Helper threads that cannot die silently.

A stage's helper thread (notify's deliveries, enrich's reverse lookups) runs its body inside
a Worker. An unexpected error in the body is logged with its traceback, counted, and the
body is started again after a short pause: the thread resumes. A body that keeps failing
(MAX_ERRORS within WINDOW_S), or a thread that ends while the stage is not stopping, makes
the worker dead, and the stage loop's next check stops the stage with WorkerDied (a non-zero
exit and a .failed marker): honcho then stops the pipeline loudly. Never a live process that
no longer works.

Errors are counted by the worker thread and read by the stage thread (check, state): plain
integer updates, no lock needed under the GIL for a counter read now and then.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from .errors import ExitCode, SluiceError

MAX_ERRORS = 5
WINDOW_S = 60.0
PAUSE_S = 0.5


class WorkerDied(SluiceError):
    exit_code = ExitCode.WORKER_DIED


class Worker:
    def __init__(self, name: str, body: Callable[[], None], log: logging.Logger, *,
                 stopping: threading.Event | None = None, max_errors: int = MAX_ERRORS,
                 window_s: float = WINDOW_S, pause_s: float = PAUSE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """body: the thread's work; it returns when `stopping` is set (a normal end)."""
        self.name, self.body, self.log = name, body, log
        self.stopping = stopping or threading.Event()
        self.max_errors, self.window_s, self.pause_s = max_errors, window_s, pause_s
        self.clock = clock
        self.errors = 0
        self.recent: collections.deque[float] = collections.deque()
        self.dead_because = ""
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    self.body()
                    return
                except Exception as err:  # noqa: BLE001 - the point: nothing kills it silently
                    if not self._survive(err):
                        return
        finally:
            if not self.stopping.is_set() and not self.dead_because:
                self.dead_because = "its thread ended"

    def _survive(self, err: Exception) -> bool:
        self.errors += 1
        now = self.clock()
        self.recent.append(now)
        while self.recent and self.recent[0] < now - self.window_s:
            self.recent.popleft()
        if len(self.recent) >= self.max_errors:
            self.log.error("%s thread failed %d times within %.0f s, giving up: %s",
                           self.name, len(self.recent), self.window_s, err, exc_info=err)
            self.dead_because = f"{len(self.recent)} errors within {self.window_s:.0f} s, " \
                                f"the last: {type(err).__name__}: {err}"
            return False
        self.log.error("%s thread failed (%s: %s); it starts again (counted as "
                       "thread_errors)", self.name, type(err).__name__, err, exc_info=err)
        self.stopping.wait(self.pause_s)
        return True

    def survived(self, what: str, err: BaseException | None) -> None:
        """An error the thread caught itself and carried on after (an event loop's failed
        callback): counted like a restart, logged with its traceback."""
        self.errors += 1
        self.log.error("%s thread: %s; it carries on (counted as thread_errors)", self.name,
                       what, exc_info=err)

    def state(self) -> str:
        if self.dead_because:
            return "dead"
        if self.thread.is_alive():
            return "alive"
        return "stopped" if self.stopping.is_set() else "not started"

    def check(self) -> None:
        """In the stage's thread: WorkerDied once this worker is dead."""
        if self.dead_because:
            raise WorkerDied(f"{self.name} thread died ({self.dead_because}); stopping so "
                             "that the pipeline is restarted")
