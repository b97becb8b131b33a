"""export: every stored audit record to an OpenTelemetry collector and syslog; /metrics.

Consumes: the stored audit rows of this host (`audit_events` in SLUICE_DB, read in id order
          after each sink's cursor in `export_cursors`), never a pipeline socket: capture,
          policy and persist never wait for it, and a dead collector costs them nothing.
Produces: with SLUICE_OTLP_ENDPOINT, one OpenTelemetry log record per audit record, POSTed
          as OTLP/HTTP protobuf to <endpoint>/v1/logs in batches of OTLP_BATCH
          (schemas/otlp_log_record.json documents a record), with SLUICE_OTLP_HEADERS;
          with SLUICE_SYSLOG, one RFC 5424 message per blocked, would-deny, late-allowed
          or refused-DNS record (pipeline/export/syslog.py);
          with SLUICE_METRICS_LISTEN, Prometheus /metrics of every stage's counters, the
          kernel's per-CPU counters, the dns stage's latency histograms and the export
          backlog (pipeline/export/metrics.py).
Binds:    no inbox (the metrics port, when set). Connects: nothing.
Delivery: each sink sends one batch at a time from a worker thread and moves its cursor
          past a batch only once the collector answered 2xx (syslog: once the socket took
          it). A collector that is down, slow (no answer in 10 s) or answering 429/5xx is
          retried with backoff (1 s doubling to 30 s, or its Retry-After); the records wait
          in the store meanwhile, so an outage of any length, or a restart of sluice,
          ends with every record delivered. Cursors are stored every CURSOR_SAVE_S
          (sooner after CURSOR_SAVE_IDS rows) and at a stop, after the batch in flight
          has been answered (up to STOP_WAIT_S): a clean restart sends nothing twice;
          after a crash (or a batch still unanswered at the stop) the records delivered
          since the last save, at most a second's or 4,096, and the batch in flight are
          sent again: at least once, never lost.
          A 4xx answer other than 429 is permanent: that batch is counted (otlp_rejected),
          logged once per status, and skipped. On PostgreSQL rows are read only up to the
          id below which no transaction can still commit one (pipeline/export/store.py).
Idle:     with neither SLUICE_OTLP_ENDPOINT nor SLUICE_SYSLOG set the stage opens no
          database and only serves /metrics (or nothing): it wakes 10 times a second on the
          shared loop and does nothing else.
Bad input: an endpoint that is not a URL, headers that do not parse, a syslog target or
          metrics address that does not parse or bind: one line naming the setting, a
          counter (otlp_config_errors, syslog_config_errors, metrics_config_errors), and
          the stage goes on without that sink. A record the store cannot give back is
          counted (store_errors) and retried.
Secrets:  header values and the user info, path and query of the endpoint never appear in a
          log line, a counter, a metric or an error: the endpoint is shown as
          scheme://host[:port] only.
Counters: otlp_exported, otlp_rejected, otlp_failures, otlp_backlog (a level: stored rows
          after the cursor), syslog_sent, syslog_failures, syslog_backlog, store_errors,
          cursor_resets, abandoned_sends, and the config errors above.

Example:  SLUICE_OTLP_ENDPOINT=http://collector:4318 SLUICE_METRICS_LISTEN=127.0.0.1:9464 \\
          sluice run export
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from ..export.delivery import Courier, DeliveryFailed, retry_delay
from ..errors import StoreError
from ..export.store import BOOLEANS, COLUMNS, StoredRows
from ..loop import BaseStage, StageIO, run_stage
from ..export.metrics import SluiceCollector
from ..export.otlp import LogEncoder, OtlpClient, parse_endpoint, parse_headers
from ..settings import Settings
from ..export.syslog import SyslogClient, format_message, parse_target, wanted
from ..topology import STAGES

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer  # what prometheus_client serves /metrics with

OTLP_BATCH = 1024     # records per request (the OpenTelemetry batch processor sends 512)
SYSLOG_BATCH = 512    # rows looked at per send
CURSOR_SAVE_S = 1.0
CURSOR_SAVE_IDS = 4096  # ... or sooner, once a cursor moved this far: what a crash repeats
BACKLOG_EVERY_S = 2.0
IDLE_POLL_S = 0.1     # how often an idle sink looks for new rows
STORE_RETRY_S = 1.0
STORE_WAIT_LOG_S = 30.0
STOP_WAIT_S = 2.5     # a batch in flight at a stop may take this long to be answered


@dataclasses.dataclass
class Job:
    """Rows read for one sink, ready to send: parts[i] covers rows up to ids[i]."""

    last_id: int               # the highest row id read (rows without a part included)
    parts: list                # what the sink's send takes, in order
    ids: list[int]
    records: list[int]         # records in each part

    def after(self, delivered: int) -> Job:
        return Job(self.last_id, self.parts[delivered:], self.ids[delivered:],
                   self.records[delivered:])


class Sink:
    """What differs between OTLP and syslog: turning rows into a job, and sending it."""

    name: str
    shown: str
    batch: int
    sent_counter: str

    def prepare(self, rows: list[tuple], now_ns: int) -> Job:
        raise NotImplementedError

    def send(self, job: Job) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OtlpSink(Sink):
    name, batch, sent_counter = "otlp", OTLP_BATCH, "otlp_exported"

    def __init__(self, client: OtlpClient, host: str) -> None:
        self.client = client
        self.shown = client.endpoint.origin
        self.encoder = LogEncoder(COLUMNS, BOOLEANS, host)

    def prepare(self, rows: list[tuple], now_ns: int) -> Job:
        return Job(rows[-1][0], [self.encoder.encode(rows, now_ns)], [rows[-1][0]], [len(rows)])

    def send(self, job: Job) -> None:
        self.client.post(job.parts[0])

    def close(self) -> None:
        self.client.close()


class SyslogSink(Sink):
    name, batch, sent_counter = "syslog", SYSLOG_BATCH, "syslog_sent"

    def __init__(self, client: SyslogClient) -> None:
        self.client = client
        self.shown = client.target.shown
        self.pid = os.getpid()

    def prepare(self, rows: list[tuple], now_ns: int) -> Job:
        parts, ids = [], []
        for row in rows:
            fields = dict(zip(COLUMNS, row, strict=True))
            if wanted(fields):
                parts.append(format_message(fields, self.pid))
                ids.append(row[0])
        return Job(rows[-1][0], parts, ids, [1] * len(parts))

    def send(self, job: Job) -> None:
        self.client.send(job.parts)

    def close(self) -> None:
        self.client.close()


class Lane:
    """One sink's progress: cursor, prepared jobs, the courier, backoff and its log lines."""

    def __init__(self, sink: Sink, io: StageIO, courier: Courier,
                 delay: Callable[..., float] = retry_delay) -> None:
        self.sink, self.io, self.courier, self.delay = sink, io, courier, delay
        self.acked = self.read_to = self.saved = 0
        self.jobs: collections.deque[Job] = collections.deque()  # the first is sent next
        self.retry_at = self.next_read = 0.0
        self.failures = 0  # transient failures in a row
        self.refusals: set[str] = set()  # permanent ones logged (each status once)
        self.started = False

    def start(self, cursor: int) -> None:
        self.acked = self.read_to = self.saved = cursor
        self.started = True

    def count(self, what: str, n: int = 1) -> None:
        self.io.counters.add(f"{self.sink.name}_{what}", n)

    def wants_rows(self, now: float) -> bool:
        return self.started and len(self.jobs) < 2 and now >= self.next_read

    def read(self, store: StoredRows, settled: int, now: float) -> None:
        """Prepare the next job from the rows after what was read (at most two wait)."""
        if store.newest < self.read_to and not self.jobs and not self.courier.busy:
            # Ids went back: the rows were removed and SQLite numbers new ones from 1 again.
            self.io.log.warning("%s: the store's newest id %d is below the cursor %d (rows "
                                "removed?): exporting from its first row", self.sink.name,
                                store.newest, self.read_to)
            self.io.counters.add("cursor_resets")
            self.acked = self.read_to = 0
        rows = store.rows(self.read_to, settled, self.sink.batch) if settled > self.read_to \
            else []
        if not rows:
            self.next_read = now + IDLE_POLL_S
            return
        self.read_to = rows[-1][0]
        job = self.sink.prepare(rows, time.time_ns())
        if job.parts:
            self.jobs.append(job)
        elif not self.jobs and not self.courier.busy:
            self.acked = job.last_id  # nothing in these rows for this sink
        else:
            self.jobs.append(job)  # keeps the cursor in order behind the jobs before it
        if len(rows) < self.sink.batch:
            self.next_read = now + IDLE_POLL_S

    def send_next(self, now: float) -> None:
        while self.jobs and not self.jobs[0].parts:
            self.acked = self.jobs.popleft().last_id
        if self.jobs and not self.courier.busy and now >= self.retry_at:
            self.courier.submit(self.jobs[0])

    def on_results(self, now: float) -> None:
        for result in self.courier.results():
            job = self.jobs[0]
            if result.error is None:
                self._delivered(job, len(job.parts))
                self.jobs.popleft()
                self.acked = job.last_id
                if self.failures:
                    self.io.log.info("%s: %s takes records again after %d failed attempt(s)",
                                     self.sink.name, self.sink.shown, self.failures)
                self.failures = 0
            else:
                self._failed(job, result.error, now)

    def _delivered(self, job: Job, parts: int) -> None:
        if parts:
            self.io.counters.add(self.sink.sent_counter, sum(job.records[:parts]))
            self.acked = job.ids[parts - 1]

    def _failed(self, job: Job, err: DeliveryFailed, now: float) -> None:
        self._delivered(job, err.delivered)
        rest = job.after(err.delivered)
        if err.permanent:
            self.jobs.popleft()
            self.acked = job.last_id
            self.count("rejected", sum(rest.records))
            if err.reason not in self.refusals:
                self.refusals.add(err.reason)
                self.io.log.error("%s: %s refused %d record(s) with %s: not retried (a "
                                  "permanent error; counted as %s_rejected, logged once)",
                                  self.sink.name, self.sink.shown, sum(rest.records),
                                  err.reason, self.sink.name)
            return
        self.jobs[0] = rest
        self.failures += 1
        self.count("failures")
        self.retry_at = now + self.delay(self.failures, err.retry_after)
        if self.failures == 1:  # one line per outage; the counter tells how long it lasts
            self.io.log.warning("%s: cannot deliver to %s (%s); retrying with backoff, the "
                                "records wait in the store", self.sink.name, self.sink.shown,
                                err.reason)

    def stop(self) -> None:
        """Let a send in flight finish (its answer moves the cursor), then close."""
        if not self.courier.stop(STOP_WAIT_S):
            self.io.counters.add("abandoned_sends")
            self.io.log.warning("%s: a batch to %s was unanswered at the stop; it is sent "
                                "again at the next start", self.sink.name, self.sink.shown)
        else:
            self.on_results(time.monotonic())
        self.courier.close()
        self.sink.close()


class ExportStage(BaseStage):
    name = "export"

    def __init__(self, *, delay: Callable[..., float] = retry_delay) -> None:
        self.delay = delay
        self.lanes: list[Lane] = []
        self.store: StoredRows | None = None
        self.metrics_server: WSGIServer | None = None
        self.store_retry_at = self.next_backlog = 0.0
        self.next_save = time.monotonic() + CURSOR_SAVE_S
        self.store_logged: set[str] = set()
        self.waiting_since: float | None = None

    def setup(self, io: StageIO) -> None:
        self.io = io
        settings = io.settings
        # A library's debug line could hold a request's path and query: theirs stay quiet.
        logging.getLogger("urllib3").setLevel(logging.WARNING)
        for sink in (self._otlp_sink(settings), self._syslog_sink(settings)):
            if sink is not None:
                self._add_lane(io, sink)
        self._serve_metrics(settings)
        if self.lanes:
            self.store = StoredRows(settings.db, settings.host_name)
            self.waiting_since = time.monotonic()
        io.ready = True
        targets = [f"{lane.sink.name} to {lane.sink.shown}" for lane in self.lanes]
        io.log.info("%s%s", f"exporting the audit records of host {settings.host_name}: "
                    + ", ".join(targets) if targets else "nothing to export (no "
                    "SLUICE_OTLP_ENDPOINT or SLUICE_SYSLOG): idle",
                    f"; /metrics on {settings.metrics_listen}" if self.metrics_server else "")

    def _add_lane(self, io: StageIO, sink: Sink) -> None:
        courier = Courier(sink.name, sink.send, io.log)
        io.watch_worker(courier.worker)
        lane = Lane(sink, io, courier, self.delay)
        io.watch_fd(courier.fd, lambda: lane.on_results(time.monotonic()))
        self.lanes.append(lane)

    def _config_error(self, counter: str, variable: str, problem: str) -> None:
        self.io.counters.add(counter)
        self.io.log.error("%s %s: going on without it", variable, problem)

    def _otlp_sink(self, settings: Settings) -> OtlpSink | None:
        if not settings.otlp_endpoint:
            return None
        try:
            endpoint = parse_endpoint(settings.otlp_endpoint)
        except ValueError as err:
            self._config_error("otlp_config_errors", "SLUICE_OTLP_ENDPOINT", str(err))
            return None
        try:
            headers = parse_headers(settings.otlp_headers)
        except ValueError as err:
            self._config_error("otlp_config_errors", "SLUICE_OTLP_HEADERS", str(err))
            return None
        return OtlpSink(OtlpClient(endpoint, headers), settings.host_name)

    def _syslog_sink(self, settings: Settings) -> SyslogSink | None:
        if not settings.syslog:
            return None
        try:
            return SyslogSink(SyslogClient(parse_target(settings.syslog)))
        except ValueError as err:
            self._config_error("syslog_config_errors", "SLUICE_SYSLOG", str(err))
            return None

    def _serve_metrics(self, settings: Settings) -> None:
        if not settings.metrics_listen:
            return
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry

        host, colon, port = settings.metrics_listen.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self._config_error("metrics_config_errors", "SLUICE_METRICS_LISTEN",
                               "is not host:port")
            return
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SluiceCollector(settings.run_dir, settings.bpf_dir, STAGES))
        try:
            self.metrics_server, _ = start_http_server(int(port), host.strip("[]"),
                                                       registry=registry)
        except OSError as err:
            self._config_error("metrics_config_errors", "SLUICE_METRICS_LISTEN",
                               f"cannot be bound: {err.strerror or err}")

    # ------------------------------------------------------------- the loop

    def tick(self, now: float) -> None:
        store = self.store
        if store is None or now < self.store_retry_at:
            return
        try:
            if not self.lanes[0].started and not self._start(store, now):
                return
            self._pump(store, now)
            if now >= self.next_backlog:
                self._count_backlog(store)
                self.next_backlog = now + BACKLOG_EVERY_S
        except StoreError as err:
            self.store_retry_at = now + STORE_RETRY_S
            self._store_failed(err)
            return
        if now >= self.next_save or any(lane.acked - lane.saved >= CURSOR_SAVE_IDS
                                        for lane in self.lanes):
            self.next_save = now + CURSOR_SAVE_S
            try:  # a store busy for longer than its timeout delays the save, not delivery
                self._save(store)
            except StoreError as err:
                self._store_failed(err)

    def _store_failed(self, err: StoreError) -> None:
        self.io.counters.add("store_errors")
        if str(err) not in self.store_logged:
            self.store_logged.add(str(err))
            self.io.log.warning("%s (counted as store_errors, logged once; retried)", err)

    def _start(self, store: StoredRows, now: float) -> bool:
        """Begin once persist's migrations made the cursor table."""
        if not store.ready():
            if self.waiting_since is not None and now - self.waiting_since > STORE_WAIT_LOG_S:
                self.io.log.warning("no table export_cursors in %s yet (persist creates it at "
                                    "start); still waiting", store.url)
                self.waiting_since = None
            return False
        for lane in self.lanes:
            lane.start(store.cursor(lane.sink.name))
            self.io.log.info("%s: delivering from row id %d on", lane.sink.name, lane.acked)
        return True

    def _pump(self, store: StoredRows, now: float) -> None:
        settled = None
        for lane in self.lanes:
            lane.send_next(now)
            if lane.wants_rows(now):
                if settled is None:
                    settled = store.settled()
                lane.read(store, settled, now)
                lane.send_next(now)

    def _save(self, store: StoredRows) -> None:
        changed = {lane.sink.name: lane.acked for lane in self.lanes
                   if lane.started and lane.acked != lane.saved}
        store.save(changed)
        for lane in self.lanes:
            lane.saved = lane.acked

    def teardown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        for lane in self.lanes:
            lane.stop()
        if self.store is not None:
            try:
                if self.lanes[0].started:
                    self._final_save(self.store)
                    self._count_backlog(self.store)  # the final counters say what is left
            except StoreError:
                pass  # said by _final_save, or the backlog stays as last counted
            finally:
                self.store.close()

    def _count_backlog(self, store: StoredRows) -> None:
        for lane in self.lanes:
            self.io.counters.level(f"{lane.sink.name}_backlog", store.backlog(lane.acked))

    def _final_save(self, store: StoredRows) -> None:
        try:  # one attempt: with the wait for the batch in flight it fits honcho's 5 s
            self._save(store)
        except StoreError as err:
            self.io.log.warning("%s: the cursors were not stored; records since the last save "
                                "are sent again at the next start", err)


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(ExportStage(), settings, ctx=ctx, stop=stop)
