"""Real-time priority lent along the answer path: from the stage that asks (dns) to the
thread that answers it (policy's), for one request at a time.

dns's own thread runs real-time (pipeline/loop.py: RealtimeThread), but before it may
release an answer the policy stage must write the answer's addresses into the maps, and
policy's thread stays ordinary because it also judges the flood's events. Under a flood that
thread waits for a CPU behind the bulk stages, and an allow request waits with it. So dns
lends it real-time scheduling just before each request (AnswerLender.lend) and takes it back
once none of its requests waits for an answer (take_back), before it releases the DNS answer:
the thread runs ahead of the bulk work for a request's sake, never for the flood's. The lender
takes it back because only the lender knows whether another lend is on its way: when the
answering thread gave it back itself, after an answer or after a batch of events with no
request, it also gave back a lend made for a request still in transit, and that request was
then answered as ordinary work behind the flood (about one request in a hundred, traced).
A lend no request has used for LEND_GRACE_S (its lender died, or took it back too late) is
given back by the thread itself (give_back).

The answering stage says which thread answers an inbox in <run_dir>/<inbox>.thread: its pid
and the start time the kernel gave that process, so that a pid the kernel has handed to
another process since is never lent anything. The run dir is the stages' own (mode 0700), and
a lender also lends only to a process of its own user. Only a stage that runs as its
process's main thread publishes one (not a stage run in a test's thread).
"""

from __future__ import annotations

import logging
import os
import select
from pathlib import Path

from .hostfiles import process_start

LENT_PRIORITY = 1  # the lowest real-time priority, as the answer path's other threads
LEND_GRACE_S = 0.01  # a request arrives within microseconds of its lend; 10 ms is generous


def thread_file(run_dir: Path, inbox: str) -> Path:
    return run_dir / f"{inbox}.thread"


def _same_user(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.geteuid()
    except OSError:
        return False


def answering_thread_text() -> str:
    """What a thread file holds for this process's main thread."""
    return f"{os.getpid()} {process_start(os.getpid())}\n"


def lent() -> bool:
    """Whether the calling thread runs real-time (a lender's doing, for the answering thread)."""
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK != os.SCHED_OTHER


def give_back() -> bool:
    """The calling thread ordinary again (nice value kept) if it was lent real-time; True then."""
    if not lent():
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
    return True


class AnswerLender:
    """Lends real-time scheduling to the thread published for an inbox, if there is one. A
    lend that cannot be made is skipped (the request goes out all the same); without the
    right to (CAP_SYS_NICE) it says so once and lends no more."""

    def __init__(self, run_dir: Path, inbox: str, log: logging.Logger, counters) -> None:
        self.path = thread_file(run_dir, inbox)
        self.log, self.counters = log, counters
        self.seen: tuple[int, int] | None = None  # the thread file's (inode, mtime) last read
        self.pid: int | None = None
        self.pidfd: int | None = None  # readable once that process has exited
        self.exited = select.poll()
        self.refused = False
        self.lent = False  # lent since the last take_back

    def lend(self) -> None:
        if self.refused or (pid := self._answering_pid()) is None:
            return
        try:
            os.sched_setscheduler(pid, os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                                  os.sched_param(LENT_PRIORITY))
        except ProcessLookupError:
            self._drop()
            return
        except PermissionError:
            self.refused = True
            self.log.warning("cannot lend real-time scheduling to the thread that answers "
                             "%s (needs CAP_SYS_NICE): a flood may delay its answers",
                             self.path.name.removesuffix(".thread"))
            return
        self.lent = True
        self.counters.add("priority_lent")

    def take_back(self) -> None:
        """The lent thread ordinary again (its nice value kept): none of the lender's requests
        waits for it now."""
        if not self.lent or self.pid is None:
            return
        self.lent = False
        if self.pidfd is not None and self.exited.poll(0):
            self._drop()  # ended since the lend: its pid may be another process's by now
            return
        try:  # the pid lent to, not the thread file read again: no stat on the answer path
            os.sched_setscheduler(self.pid, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK,
                                  os.sched_param(0))
        except ProcessLookupError:
            self._drop()
            return
        except OSError:
            return  # the thread gives an unused lend back itself (LEND_GRACE_S)
        self.counters.add("priority_taken_back")

    def close(self) -> None:
        self._drop()

    def _answering_pid(self) -> int | None:
        """The published pid while that process lives; the file is read again when it changes."""
        try:
            stat = self.path.stat()
        except OSError:
            self._drop()
            self.seen = None
            return None
        if (stat.st_ino, stat.st_mtime_ns) != self.seen:
            self._drop()
            self.seen = (stat.st_ino, stat.st_mtime_ns)
            self._adopt()
        elif self.pidfd is not None and self.exited.poll(0):
            self._drop()  # that process has ended; its pid may come back as another's
        return self.pid

    def _adopt(self) -> None:
        try:
            pid_text, start = self.path.read_text().split()
            pid = int(pid_text)
            pidfd = os.pidfd_open(pid)
        except (OSError, ValueError):
            return
        if process_start(pid) != start or not _same_user(pid):
            os.close(pidfd)  # the pid is another process's by now
            return
        self.pid, self.pidfd = pid, pidfd
        self.exited.register(pidfd, select.POLLIN)

    def _drop(self) -> None:
        if self.pidfd is not None:
            self.exited.unregister(self.pidfd)
            os.close(self.pidfd)
        self.pid = self.pidfd = None
