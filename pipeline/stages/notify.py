"""notify: one notification per blocked destination, delivered with retry.

Consumes: `notices` batches on ipc://<run_dir>/notify.sock: policy sends one for every
          connection_blocked and protocol_blocked outcome (would-deny blocks in audit mode
          too), without ever waiting for this stage.
Produces: with SLUICE_NOTIFY_URL, one HTTP POST per destination key (`<hostname or ip>:
          <port>`, the protocol number for protocol blocks; reference §2.7), a JSON body
          {hostname, ip, port, protocol, process, first_seen (RFC 3339), mode, event_type,
          host}, and `Authorization: Bearer <SLUICE_NOTIFY_TOKEN>` when a token is set.
          Without a URL: one log line per new key.
Binds:    notify.sock. Connects: nothing.
Delivery: a worker thread posts (pipeline.notify.WebhookClient, 5 s per attempt), so a slow
          or dead sink never stops this loop from draining its inbox. For each key:
          * its first notice claims it; later notices for a claimed key are suppressed;
          * a failed attempt (no 2xx answer: an error status, a redirect, no answer) is
            retried after about 1, 2, 4 ... s (doubling, capped at 60 s, upper half
            jittered), MAX_ATTEMPTS attempts in all; notices meanwhile stay suppressed, so
            the sink never gets the same destination twice at once;
          * after the last failed attempt the key is released: its next notice starts over;
          * at most MAX_PENDING keys are in delivery: a new key beyond that is released at
            once (queue_dropped) and tried again at its next notice.
Memory:   delivered keys are rows of notified_destinations in SLUICE_DB (per host; the
          table comes with persist's migrations, which notify waits for at start, then
          loads), so a restarted pipeline does not alert again. Notify opens its own
          connection for that table alone. Delivery is at least once: a crash between a
          POST and its row posts that destination again.
Secrets:  the token never appears in a log line, an error or a counter; the URL is logged
          as scheme://host[:port] only (a webhook's path is often its secret).
Counters: notices_received, duplicates_suppressed, delivered, delivery_failures, retries,
          gave_up, queue_dropped, store_errors, internal_errors (an attempt that failed on
          an error of sluice's own, logged and retried), courier_thread_errors (the
          delivery thread restarted; `sluice status` shows whether it is alive).
Start:    a URL that is not http(s), or a database that cannot be opened, stops the stage
          with one line.
Bad input: a malformed message or record is counted and skipped (logged once per kind).

Example:  SLUICE_NOTIFY_URL=https://alerts.example/hook SLUICE_NOTIFY_TOKEN=... sluice run notify
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import os
import queue
import threading
import time
from typing import Callable

import sqlalchemy as sa
import zmq

from ..audit import sql_timestamp
from ..errors import StoreError
from ..events import Notice
from ..loop import BaseStage, StageIO, run_stage
from ..notify import (DeliveryError, LogClient, Notification, NotificationTracker,
                      StateMachineClient, WebhookClient, retry_delay, sink_origin)
from ..settings import Settings
from ..store import AuditStore, notified_destinations
from ..workers import Worker

MAX_ATTEMPTS = 8      # one to three minutes of a dead sink before a key is released
MAX_PENDING = 1_000   # keys in delivery at once
STORE_WAIT_S = 30.0   # how long to wait at start for persist to create the table
STOP_WAIT_S = 1.0     # a post in progress at a stop is abandoned after this
_STOP = object()


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """The end of one delivery attempt, from the worker to the stage loop."""

    notification: Notification
    attempt: int                  # 1 for the first
    error: str = ""               # "" when delivered
    retry_in: float | None = None  # seconds to the next attempt; None when none follows
    stored: bool = True           # delivered and remembered in the store
    internal: bool = False        # the attempt failed on an error of sluice's own (logged)


class DeliveredKeys:
    """The keys this host has delivered, in notified_destinations. Borrows AuditStore's
    engine set-up (WAL, busy timeout), never its audit_events writer."""

    def __init__(self, url: str, host: str) -> None:
        self.store = AuditStore(url)
        self.host = host

    def ready(self) -> bool:
        """Whether persist's migrations have created the table yet (a database that is
        down for now is not ready either)."""
        try:
            return sa.inspect(self.store.engine).has_table(notified_destinations.name)
        except sa.exc.SQLAlchemyError:
            return False

    def load(self) -> set[str]:
        column = notified_destinations.c
        query = sa.select(column.destination).where(column.host == self.host)
        try:
            with self.store.engine.connect() as conn:
                return set(conn.execute(query).scalars())
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.store.url}: cannot read notified destinations: "
                             f"{type(err).__name__}") from None

    def remember(self, n: Notification) -> bool:
        """Store a delivered key; False when the database refused (logged by the stage)."""
        row = {"host": self.host, "destination": n.key, "hostname": n.hostname, "ip": n.ip,
               "port": n.port, "protocol": n.protocol,
               "first_seen": sql_timestamp(n.first_seen_ns),
               "delivered_at": sql_timestamp(time.time_ns())}
        try:
            with self.store.engine.begin() as conn:
                conn.execute(notified_destinations.insert().values(**row))
        except sa.exc.IntegrityError:
            return True  # delivered before, by an earlier run that did not know it
        except sa.exc.SQLAlchemyError:
            return False
        return True

    def close(self) -> None:
        self.store.close()


class Courier:
    """The webhook as a StateMachineClient that never blocks: send() only queues; a worker
    thread makes the attempts and reports each through an eventfd the stage loop polls.
    An unexpected error in an attempt is logged and reported as a failed attempt (retried
    like any other); one anywhere else restarts the thread (pipeline/workers.py) with what
    was due kept, so no notification is lost with it."""

    def __init__(self, client: StateMachineClient, remember: Callable[[Notification], bool], *,
                 log: logging.Logger, max_attempts: int = MAX_ATTEMPTS,
                 capacity: int = MAX_PENDING, delay: Callable[[int], float] = retry_delay) -> None:
        self.client, self.remember, self.delay, self.log = client, remember, delay, log
        self.max_attempts, self.capacity = max_attempts, capacity
        self.pending = 0  # keys queued, being sent or waiting to retry (stage thread only)
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._reports: collections.deque[Report] = collections.deque()
        self._stopping = threading.Event()
        # (when, tiebreak, what, attempt): kept here so that a restarted thread goes on
        self._due: list[tuple[float, int, Notification, int]] = []
        self._order = itertools.count()
        self._logged: set[str] = set()  # internal errors, by type (each logged once)
        self.worker = Worker("courier", self._run, log, stopping=self._stopping)

    def start(self) -> None:
        self.worker.start()

    def send(self, notification: Notification) -> None:
        if self.pending >= self.capacity:
            raise DeliveryError("delivery queue full")
        self.pending += 1
        self._inbox.put(notification)

    def finished(self) -> list[Report]:
        """Attempts that ended since the last call (reading resets the eventfd)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        reports = []
        while self._reports:
            report = self._reports.popleft()
            if report.retry_in is None:
                self.pending -= 1
            reports.append(report)
        return reports

    def _run(self) -> None:
        due, order = self._due, self._order
        while not self._stopping.is_set():
            wait = max(0.0, due[0][0] - time.monotonic()) if due else None
            try:
                item = self._inbox.get(timeout=wait)
            except queue.Empty:
                item = None
            if isinstance(item, Notification):
                heapq.heappush(due, (time.monotonic(), next(order), item, 1))
            while due and due[0][0] <= time.monotonic() and not self._stopping.is_set():
                _, _, notification, attempt = due[0]
                report = self._attempt(notification, attempt)
                heapq.heappop(due)
                if report.retry_in is not None:
                    heapq.heappush(due, (time.monotonic() + report.retry_in, next(order),
                                         notification, attempt + 1))
                self._reports.append(report)
                os.eventfd_write(self.fd, 1)

    def _attempt(self, notification: Notification, attempt: int) -> Report:
        try:
            try:
                self.client.send(notification)
            except DeliveryError as err:
                return self._failed(notification, attempt, str(err))
            return Report(notification, attempt, stored=self.remember(notification))
        except Exception as err:  # noqa: BLE001 - a bug must not take the notification along
            if type(err).__name__ not in self._logged:
                self._logged.add(type(err).__name__)
                self.log.error("delivery of %s failed on an internal error, retried like a "
                               "failed post (logged once per kind)", notification.key,
                               exc_info=err)
            report = self._failed(notification, attempt, f"internal error: {type(err).__name__}")
            return dataclasses.replace(report, internal=True)

    def _failed(self, notification: Notification, attempt: int, error: str) -> Report:
        retry_in = self.delay(attempt) if attempt < self.max_attempts else None
        return Report(notification, attempt, error, retry_in)

    def close(self) -> None:
        """Stop the worker; a post in progress is abandoned after STOP_WAIT_S."""
        self._stopping.set()
        self._inbox.put(_STOP)  # wakes a worker waiting for work
        thread = self.worker.thread
        if thread.is_alive():
            thread.join(STOP_WAIT_S)
        if not thread.is_alive():  # a worker still posting may yet write the fd
            os.close(self.fd)


class NotifyStage(BaseStage):
    name = "notify"

    def __init__(self, client: StateMachineClient | None = None,
                 delay: Callable[[int], float] = retry_delay,
                 max_attempts: int = MAX_ATTEMPTS, max_pending: int = MAX_PENDING) -> None:
        self.client, self.delay = client, delay
        self.max_attempts, self.max_pending = max_attempts, max_pending
        self.tracker: NotificationTracker | None = None  # None until the store is read
        self.early: list[Notice] = []  # notices that came before that
        self.courier: Courier | None = None
        self.memory: DeliveredKeys | None = None
        self.errors_logged: set[str] = set()

    def setup(self, io: StageIO) -> None:
        self.io = io
        io.bind_inboxes()
        settings = io.settings
        if not settings.notify_url:
            self.tracker = NotificationTracker(LogClient(io.log))
            io.ready = True
            io.log.info("listening on notify.sock; no SLUICE_NOTIFY_URL: each new blocked "
                        "destination gets one line in this log")
            return
        webhook = self.client or WebhookClient(settings.notify_url, settings.notify_token,
                                               settings.host_name)
        self.memory = DeliveredKeys(settings.db, settings.host_name)
        self.courier = Courier(webhook, self.memory.remember, log=io.log,
                               max_attempts=self.max_attempts, capacity=self.max_pending,
                               delay=self.delay)
        io.watch_fd(self.courier.fd, self._reports)  # the loop polls what setup registers
        io.watch_worker(self.courier.worker)
        self.store_deadline = time.monotonic() + STORE_WAIT_S
        io.log.info("listening on notify.sock; posting to %s (%s)",
                    sink_origin(settings.notify_url),
                    "bearer token set" if settings.notify_token else "no token")

    def tick(self, now: float) -> None:
        if self.tracker is not None:
            return
        if not self.memory.ready():
            if now > self.store_deadline:
                raise StoreError(f"{self.memory.store.url}: no table notified_destinations "
                                 f"after {STORE_WAIT_S:.0f} s (persist creates it at start)")
            return
        self._start_delivery(self.memory.load())

    def _start_delivery(self, notified: set[str]) -> None:
        self.courier.start()
        self.tracker = NotificationTracker(self.courier, notified)
        self.io.ready = True
        self.io.log.info("%d destination(s) notified before; delivering", len(notified))
        early, self.early = self.early, []
        self.handle("notify", "notices", early)

    def handle(self, inbox: str, kind: str, records: list[Notice]) -> None:
        if self.tracker is None:
            room = max(0, self.max_pending - len(self.early))
            self.early += records[:room]
            self.io.counters.add("queue_dropped", len(records) - len(records[:room]))
            return
        for n in records:
            self._notice(n)

    def _notice(self, n: Notice) -> None:
        try:
            sent = self.tracker.send_notification(
                n.hostname, n.ip, n.port, protocol=n.protocol, process=n.process,
                first_seen_ns=n.timestamp_ns, mode=n.mode, event_type=n.event_type)
        except DeliveryError:
            self.io.counters.add("queue_dropped")
            return
        if not sent:
            self.io.counters.add("duplicates_suppressed")
        elif self.courier is None:
            self.io.counters.add("delivered")  # the log line is the delivery

    def _reports(self) -> None:
        for report in self.courier.finished():
            if report.attempt > 1:
                self.io.counters.add("retries")
            if report.internal:
                self.io.counters.add("internal_errors")
            if report.error:
                self._failed(report)
                continue
            self.io.counters.add("delivered")
            self.errors_logged.clear()
            if not report.stored:
                self.io.counters.add("store_errors")
                self.io.log.warning("delivered %s but could not store it: a restart may "
                                    "notify it again", report.notification.key)

    def _failed(self, report: Report) -> None:
        key = report.notification.key
        self.io.counters.add("delivery_failures")
        if report.retry_in is None:
            self.tracker.release(key)
            self.io.counters.add("gave_up")
            self.io.log.warning("gave up on %s after %d attempt(s) (%s); its next block "
                                "tries again", key, report.attempt, report.error)
        elif report.error not in self.errors_logged:
            self.errors_logged.add(report.error)  # each distinct failure once, until one works
            self.io.log.warning("delivery of %s failed (%s); retrying in %.1f s", key,
                                report.error, report.retry_in)

    def teardown(self) -> None:
        self.io.counters.add("queue_dropped", len(self.early))
        if self.courier is not None:
            self.courier.close()
        if self.memory is not None:
            self.memory.close()


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(NotifyStage(), settings, ctx=ctx, stop=stop)
