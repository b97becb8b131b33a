"""Delivery to an outside sink (a collector, a syslog server): failures, backoff, the worker.

A sink's send either returns (delivered) or raises DeliveryFailed with a reason that holds no
secret (it is logged). `permanent` failures (a collector answering 4xx) are not retried;
`delivered` says how many parts of a multi-part send got through before it failed.

The Courier runs one send at a time in a worker thread, so a slow or dead sink never holds
up the stage loop, and reports each result through an eventfd that the loop polls. An
unexpected error in a send (a bug, not the sink) is logged and reported as a failed send,
retried like one; the thread runs in a Worker (pipeline/workers.py), so it never dies
silently.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import random
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from ..workers import Worker

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0     # an hour-long outage is retried every 30 s; recovery is seen that soon
MAX_RETRY_AFTER_S = 300.0
_STOP = object()
J = TypeVar("J")  # what a sink's send takes


class DeliveryFailed(Exception):
    def __init__(self, reason: str, *, permanent: bool = False,
                 retry_after: float | None = None, delivered: int = 0) -> None:
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent
        self.retry_after, self.delivered = retry_after, delivered


def retry_delay(failures: int, retry_after: float | None = None,
                rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after `failures` failures in a row: 1, 2, 4 ... 30,
    the upper half jittered (so a fleet does not return at once), or the sink's own
    Retry-After when it gave one (at most 5 minutes)."""
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S)
    base = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** max(0, failures - 1))
    return base / 2 + base / 2 * rand()


@dataclasses.dataclass
class Result:
    job: object
    error: DeliveryFailed | None = None


class Courier(Generic[J]):
    """One worker thread that runs send(job) for one job at a time."""

    def __init__(self, name: str, send: Callable[[J], None],
                 log: logging.Logger | None = None) -> None:
        self.send = send
        self.log = log or logging.getLogger("sluice.delivery")
        self._logged: set[str] = set()  # internal errors, by type (each logged once)
        self.busy = False  # a job handed over and not yet reported (stage thread only)
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: collections.deque[Result] = collections.deque()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = threading.Event()
        self.worker = Worker(f"{name}_courier", self._run, self.log, stopping=self._stopping)
        self._thread = self.worker.thread
        self.worker.start()

    def submit(self, job: J) -> None:
        assert not self.busy, "one job at a time"
        self.busy = True
        self._idle.clear()
        self._jobs.put(job)

    def results(self) -> list[Result]:
        """Sends that ended since the last call (reading resets the eventfd)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        done = []
        while self._results:
            done.append(self._results.popleft())
            self.busy = False
        return done

    def _run(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            try:
                self.send(job)
                result = Result(job)
            except DeliveryFailed as err:
                result = Result(job, err)
            except Exception as err:  # a bug must not take the thread along
                if type(err).__name__ not in self._logged:
                    self._logged.add(type(err).__name__)
                    self.log.error("a send failed on an internal error, retried like a failed "
                                   "send (logged once per kind)", exc_info=err)
                result = Result(job, DeliveryFailed(f"internal error: {type(err).__name__}"))
            self._results.append(result)
            self._idle.set()
            os.eventfd_write(self.fd, 1)

    def stop(self, wait: float) -> bool:
        """Stop the worker, letting a send in progress finish for up to `wait` seconds;
        False if it is still going (its result is then unknown). results() still works."""
        finished = self._idle.wait(wait)
        self._stopping.set()
        self._jobs.put(_STOP)
        self._thread.join(0.5 if finished else 0)
        return finished

    def close(self) -> None:
        if not self._thread.is_alive():  # a worker still sending may yet write the fd
            os.close(self.fd)
