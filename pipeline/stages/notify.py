"""notify: one notification per blocked destination, delivered with retry; storms summarized.

Consumes: `notices` batches on ipc://<run_dir>/notify.sock: policy sends one for every
          connection_blocked and protocol_blocked outcome (would-deny blocks in audit mode
          too), without ever waiting for this stage.
Produces: with SLUICE_NOTIFY_URL, one HTTP POST per destination key (`<hostname or ip>:
          <port>`, the protocol number for protocol blocks; reference §2.7), a JSON body
          {hostname, ip, port, protocol, process, first_seen (RFC 3339), mode, event_type,
          host}, and `Authorization: Bearer <SLUICE_NOTIFY_TOKEN>` when a token is set.
          Without a URL: one log line per new key. To persist: `delivered_destinations`,
          what was alerted on (below).
Binds:    notify.sock. Connects: persist.
Delivery: a worker thread posts (pipeline.webhook.WebhookClient, 5 s per attempt), so a slow
          or dead sink never stops this loop from draining its inbox. For each key:
          * its first notice claims it; later notices for a claimed key are suppressed;
          * a failed attempt (no 2xx answer: an error status, a redirect, no answer) is
            retried after about 1, 2, 4 ... s (doubling, capped at 60 s, upper half
            jittered), MAX_ATTEMPTS attempts in all; notices meanwhile stay suppressed, so
            the sink never gets the same destination twice at once;
          * after the last failed attempt the key is released: its next notice starts over.
Storms:   at most MAX_PENDING keys are in delivery at once. A new key beyond that (new
          destinations coming faster than the webhook takes them) joins the storm: once
          per SUMMARY_INTERVAL_S one summary notice goes out ahead of the queue,
          {event_type: blocked_destinations_summary, destinations_count, first_seen,
          last_seen, by_process, by_port ("443/TCP"), the first destinations, a `sluice
          query` to see them all}, while single notices go on for what fits. A summary is
          retried like a notice; one given up on goes back into the next. So every
          blocked destination is either alerted alone or counted in a delivered summary.
Memory:   each delivered key (alone or in a summary) goes to persist, the store's one
          writer, as a `delivered_destinations` record; persist keeps it in
          notified_destinations of SLUICE_DB (per host), batched beside the audit rows, so
          a flood of new destinations never holds up the audit writes. At start notify waits
          for persist's migrations and reads those keys (read-only), so a restarted pipeline
          does not alert again. Delivery is at least once: a crash between a POST and its
          row posts that destination again.
Secrets:  the token never appears in a log line, an error or a counter; the URL is logged
          as scheme://host[:port] only (a webhook's path is often its secret).
Counters: notices_received, duplicates_suppressed, delivered, delivery_failures, retries,
          gave_up, stormed (keys summarized rather than sent alone), summaries_delivered,
          summarized (keys counted in delivered summaries), summary_failures,
          undelivered_at_stop, internal_errors (an attempt that failed on an error of
          sluice's own, logged and retried), courier_thread_errors (the delivery thread
          restarted; `sluice status` shows whether it is alive), persist_sent/_dropped.
Start:    a URL that is not http(s) stops the stage with one line; so does a store without
          notified_destinations after STORE_WAIT_S.
Bad input: a malformed message or record is counted and skipped (logged once per reason).

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
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from ..errors import StoreError
from ..events import DeliveredDestination, Notice
from ..fingerprints import FingerprintSet
from ..loop import BaseStage, StageIO, batched, run_stage
from ..notify import (DeliveryError, LogClient, Notification, NotificationTracker,
                      NotifySink, Storm, Summary, destination_key, retry_delay, sink_origin)
from ..settings import Settings
from ..reactor import Timer
from ..topology import wiring_text
from ..workers import Worker

# Imported in setup, with a URL only: SQLAlchemy and the HTTP client would be most of this
# stage's memory, and without a URL they are unused.
if TYPE_CHECKING:
    from ..audit.store import DeliveredKeys

MAX_ATTEMPTS = 8      # one to three minutes of a dead sink before a key is released
MAX_PENDING = 1_000   # keys in delivery at once
STORE_WAIT_S = 30.0   # how long to wait at start for persist to create the table
STORE_POLL_S = 0.1    # how often it looks for the table meanwhile
STOP_WAIT_S = 1.0     # a post in progress at a stop is abandoned after this
SUMMARY_INTERVAL_S = 10.0  # at most one storm summary per interval
_STOP = object()


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """The end of one delivery attempt, from the worker to the stage loop."""

    notification: Notification | Summary
    attempt: int                  # 1 for the first
    error: str = ""               # "" when delivered
    retry_in: float | None = None  # seconds to the next attempt; None when none follows
    internal: bool = False        # the attempt failed on an error of sluice's own (logged)


class Courier:
    """The webhook as a StateMachineClient that never blocks: send() only queues; a worker
    thread makes the attempts and reports each through an eventfd the stage loop polls.
    An unexpected error in an attempt is logged and reported as a failed attempt (retried
    like any other); one anywhere else restarts the thread (pipeline/workers.py) with what
    was due kept, so no notification is lost with it."""

    def __init__(self, client: NotifySink, *, log: logging.Logger,
                 max_attempts: int = MAX_ATTEMPTS, capacity: int = MAX_PENDING,
                 delay: Callable[[int], float] = retry_delay) -> None:
        self.client, self.delay, self.log = client, delay, log
        self.max_attempts, self.capacity = max_attempts, capacity
        self.pending = 0  # keys queued, being sent or waiting to retry (stage thread only)
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._first: collections.deque[Summary] = collections.deque()  # ahead of the queue
        self._reports: collections.deque[Report] = collections.deque()
        self._stopping = threading.Event()
        # (when, tiebreak, what, attempt): kept here so that a restarted thread goes on
        self._due: list[tuple[float, int, Notification | Summary, int]] = []
        self._order = itertools.count()
        self._logged: set[str] = set()  # internal errors, by type (each logged once)
        self.worker = Worker("courier", self._run, log, stopping=self._stopping)

    def start(self) -> None:
        self.worker.start()

    def full(self) -> bool:
        return self.pending >= self.capacity

    def send(self, notification: Notification) -> None:
        if self.full():
            raise DeliveryError("delivery queue full")
        self.pending += 1
        self._inbox.put(notification)

    def send_first(self, summary: Summary) -> None:
        """A storm summary: attempted before everything queued, whatever the capacity."""
        self.pending += 1
        self._first.append(summary)
        self._inbox.put(None)  # wakes a worker waiting for work

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
            while self._first:
                heapq.heappush(due, (0.0, next(order), self._first.popleft(), 1))
            while due and due[0][0] <= time.monotonic() and not self._stopping.is_set():
                _, _, notification, attempt = due[0]
                report = self._attempt(notification, attempt)
                heapq.heappop(due)
                if report.retry_in is not None:
                    heapq.heappush(due, (time.monotonic() + report.retry_in, next(order),
                                         notification, attempt + 1))
                self._reports.append(report)
                os.eventfd_write(self.fd, 1)

    def _attempt(self, notification: Notification | Summary, attempt: int) -> Report:
        try:
            try:
                self.client.send(notification)
            except DeliveryError as err:
                return self._failed(notification, attempt, str(err))
            return Report(notification, attempt)
        except Exception as err:  # a bug must not take the notification along
            if type(err).__name__ not in self._logged:
                self._logged.add(type(err).__name__)
                self.log.error("delivery of %s failed on an internal error, retried like a "
                               "failed post (logged once per kind)", notification.key,
                               exc_info=err)
            report = self._failed(notification, attempt, f"internal error: {type(err).__name__}")
            return dataclasses.replace(report, internal=True)

    def _failed(self, notification: Notification | Summary, attempt: int,
                error: str) -> Report:
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

    def __init__(self, client: NotifySink | None = None,
                 delay: Callable[[int], float] = retry_delay,
                 max_attempts: int = MAX_ATTEMPTS, max_pending: int = MAX_PENDING,
                 summary_interval: float = SUMMARY_INTERVAL_S,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.client, self.delay, self.clock = client, delay, clock
        self.max_attempts, self.max_pending = max_attempts, max_pending
        self.summary_interval = summary_interval
        self.tracker: NotificationTracker | None = None  # None until the store is read
        self.early: list[Notice] = []  # notices that came before that
        self.courier: Courier | None = None
        self.memory: DeliveredKeys | None = None
        self.storm = Storm()
        self.summary_out = False  # a summary is in delivery
        self.next_summary = 0.0
        self.summary_timer: Timer | None = None
        self.delivered: list[DeliveredDestination] = []  # for persist, sent on the tick
        self.errors_logged: set[str] = set()

    def setup(self, io: StageIO) -> None:
        self.io = io
        io.bind_inboxes()
        settings = io.settings
        self.host = settings.host_name
        if not settings.notify_url:
            self.tracker = NotificationTracker(LogClient(io.log))
            io.ready = True
            io.log.info("%s; no SLUICE_NOTIFY_URL: each new blocked destination gets one "
                        "line in this log", wiring_text(self.name))
            return
        from ..audit.store import DeliveredKeys
        from ..webhook import WebhookClient
        webhook = self.client or WebhookClient(settings.notify_url, settings.notify_token,
                                               settings.host_name)
        self.memory = memory = DeliveredKeys(settings.db, settings.host_name)
        self.persist = io.connect_feeds()["delivered_destinations"]
        self.courier = courier = Courier(webhook, log=io.log, max_attempts=self.max_attempts,
                                         capacity=self.max_pending, delay=self.delay)
        io.watch_fd(courier.fd, lambda: self._reports(courier))  # polled once setup is done
        io.watch_worker(courier.worker)
        self.store_deadline = io.reactor.clock() + STORE_WAIT_S
        io.reactor.after(0, lambda: self._wait_for_store(courier, memory))
        io.log.info("%s; posting to %s (%s)", wiring_text(self.name),
                    sink_origin(settings.notify_url),
                    "bearer token set" if settings.notify_token else "no token")

    def tick(self, now: float) -> None:
        for batch in batched(self.delivered, self.io.settings.batch_max):
            self.persist.send(batch)
        self.delivered = []

    def _wait_for_store(self, courier: Courier, memory: DeliveredKeys) -> None:
        """Delivery starts once persist has made the delivered-destinations table."""
        if memory.ready():
            self._start_delivery(courier, memory.load())
        elif self.io.reactor.clock() > self.store_deadline:
            raise StoreError(f"{memory.url}: no table notified_destinations after "
                             f"{STORE_WAIT_S:.0f} s (persist creates it at start)")
        else:
            self.io.reactor.after(STORE_POLL_S, lambda: self._wait_for_store(courier, memory))

    def _summary_due(self) -> None:
        """Arm the timer of the next storm summary: one in delivery at a time, at most one
        per summary_interval."""
        if self.summary_timer is None and self.storm and not self.summary_out:
            delay = max(0.0, self.next_summary - self.io.reactor.clock())
            self.summary_timer = self.io.reactor.after(delay, self._summarize)

    def _summarize(self) -> None:
        self.summary_timer = None
        courier = self.courier
        if courier is None or self.tracker is None or self.summary_out:
            return  # delivery has not started: _start_delivery arms the timer again
        summary = self.storm.take()
        if summary is None:
            return
        courier.send_first(summary)
        self.summary_out = True
        self.next_summary = self.io.reactor.clock() + self.summary_interval

    def _start_delivery(self, courier: Courier, notified: FingerprintSet) -> None:
        courier.start()
        self.tracker = tracker = NotificationTracker(courier, notified)
        for member in self.storm.members:  # what came early beyond the buffer: summarized
            tracker.claim(member.key)
        self.io.ready = True
        self.io.log.info("%d destination(s) notified before; delivering", len(notified))
        early, self.early = self.early, []
        self.handle("notify", "notices", early)
        self._summary_due()

    def handle(self, inbox: str, kind: str, records: list[Notice]) -> None:
        tracker = self.tracker
        if tracker is None:
            room = max(0, self.max_pending - len(self.early))
            self.early += records[:room]
            for n in records[room:]:
                self._storm(self._notification(n))
            return
        for n in records:
            self._notice(tracker, n)

    @staticmethod
    def _notification(n: Notice) -> Notification:
        return Notification(destination_key(n.hostname, n.ip, n.port), n.hostname, n.ip,
                            n.port, n.protocol, n.process, n.timestamp_ns, n.mode, n.event_type)

    def _notice(self, tracker: NotificationTracker, n: Notice) -> None:
        if self.courier is not None and self.courier.full():
            notification = self._notification(n)
            if tracker.claim(notification.key):
                self._storm(notification)
            else:
                self.io.counters.add("duplicates_suppressed")
            return
        sent = tracker.send_notification(
            n.hostname, n.ip, n.port, protocol=n.protocol, process=n.process,
            first_seen_ns=n.timestamp_ns, mode=n.mode, event_type=n.event_type)
        if not sent:
            self.io.counters.add("duplicates_suppressed")
        elif self.courier is None:
            self.io.counters.add("delivered")  # the log line is the delivery

    def _storm(self, notification: Notification) -> None:
        if not self.storm:
            self.io.log.warning("new blocked destinations come faster than the webhook takes "
                                "them: summarizing (one summary every %g s)",
                                self.summary_interval)
        self.storm.add(notification)
        self.io.counters.add("stormed")
        self._summary_due()

    def _reports(self, courier: Courier) -> None:
        for report in courier.finished():
            if report.attempt > 1:
                self.io.counters.add("retries")
            if report.internal:
                self.io.counters.add("internal_errors")
            if isinstance(report.notification, Summary):
                self._summary_report(report, report.notification)
            elif report.error:
                self._failed(report)
            else:
                self.io.counters.add("delivered")
                self.errors_logged.clear()
                self._remember(report.notification)

    def _summary_report(self, report: Report, summary: Summary) -> None:
        if not report.error:
            self.summary_out = False
            self.io.counters.add("summaries_delivered")
            self.io.counters.add("summarized", summary.count)
            self.io.log.warning("delivered a summary of %d new blocked destination(s)",
                                summary.count)
            for member in summary.members:
                self._remember(member)
            self._summary_due()
            return
        self.io.counters.add("summary_failures")
        if report.retry_in is None:
            self.summary_out = False
            self.storm.give_back(summary)  # into the next summary: never dropped
            self.io.log.warning("gave up on a summary of %d destination(s) (%s); they go into "
                                "the next one", summary.count, report.error)
            self._summary_due()

    def _remember(self, n: Notification) -> None:
        self.delivered.append(DeliveredDestination(
            self.host, n.key, n.hostname, n.ip, n.port, n.protocol, n.first_seen_ns,
            self.clock()))

    def _failed(self, report: Report) -> None:
        key = report.notification.key
        self.io.counters.add("delivery_failures")
        if report.retry_in is None:
            assert self.tracker is not None, "delivery started with it: there are reports"
            self.tracker.release(key)
            self.io.counters.add("gave_up")
            self.io.log.warning("gave up on %s after %d attempt(s) (%s); its next block "
                                "tries again", key, report.attempt, report.error)
        elif report.error not in self.errors_logged:
            self.errors_logged.add(report.error)  # each distinct failure once, until one works
            self.io.log.warning("delivery of %s failed (%s); retrying in %.1f s", key,
                                report.error, report.retry_in)

    def teardown(self) -> None:
        undelivered = len(self.early) + len(self.storm)
        if self.courier is not None:
            if self.tracker is not None:
                # attempts that ended before the stop count as such
                self._reports(self.courier)
            self.courier.close()
            undelivered += self.courier.pending
            for batch in batched(self.delivered, self.io.settings.batch_max):
                self.persist.send(batch)
        self.io.counters.add("undelivered_at_stop", undelivered)
        if self.memory is not None:
            self.memory.close()


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(NotifyStage(), settings, ctx=ctx, stop=stop)
