"""persist: the single writer of the audit trail, as SQL rows and JSONL lines.

Consumes: `audit_records` batches on its inbox ipc://<run_dir>/persist.sock (PULL), from
          policy, dns and the start-up scan of existing connections; and
          `delivered_destinations` from notify (the store has one writer: this stage).
Produces: one row per record in `audit_events` of SLUICE_DB (SQLite in WAL mode by default,
          migrated at start) and one cargowall-compatible line per record in
          SLUICE_AUDIT_LOG (appended, never truncated; none when the setting is empty).
Binds:    persist.sock. Connects: nothing.
Notify:   notify's delivered destinations go to notified_destinations, a chunk of at most
          DELIVERED_CHUNK per tick and only when no audit record waits, so a flood of new
          destinations never holds up the audit writes (delivered_stored; beyond DELIVERED_HELD
          waiting, delivered_dropped: such a destination may be alerted again after a
          restart).
Order:    records are committed to SQL in batches (SLUICE_BATCH_MAX x 16 records, or what
          arrived within SLUICE_FLUSH_INTERVAL), and only then appended to the JSONL file, so
          the file never holds a record the database lacks. A record whose event_id is
          already stored is skipped in both (duplicates_skipped).
Exactly once: records from capture's journal carry a journal number and a stable event id.
          Once a record is in SQL and JSONL (or was found stored already, or was rejected),
          persist marks it in the journal's acknowledgement bitmaps (SLUICE_JOURNAL_DIR/acks),
          and capture deletes a segment when every record of it is marked; at start capture
          sends the unmarked ones again and the event-id dedup stores each once. At start,
          rows that a crash left committed to SQL but not yet written to JSONL are appended
          to the file (jsonl_caught_up), found after the file's last line, or, when the file
          has none (logrotate just moved it away), after the last line persist wrote
          (SLUICE_JOURNAL_DIR/jsonl.last; a failure to keep it is counted, jsonl_mark_errors).
          Before its first line ever, that mark is the last row stored at start.
Back-pressure: persist takes no new messages while it holds a commit's worth of records
          (SLUICE_BATCH_MAX x 16) or while the database or the file fails; the backlog then
          waits upstream, in the end in capture's journal, never in memory here.
Bad input: a frame that is not an audit_records message is counted (malformed_messages) and
          skipped; so is a record with bad fields or out-of-range values (malformed_records)
          and one the database refuses (records_rejected), each reason logged once. A record
          without timestamp, host or event_id gets now, this host's name (SLUICE_HOST) or a
          fresh id.
Failures: an unusable database or log file at start stops the stage with one line (exit 5).
          Later, a failing SQL or JSONL write (database locked, disk full) keeps the records,
          is counted (store_errors, jsonl_errors), logged once per distinct error and retried
          with backoff. SIGHUP reopens the JSONL file (logrotate). A stop takes what policy,
          notify and dns still send until each has sent its feed end (pipeline/stopping.py),
          stores what is held, then exits; what could not be stored is counted
          (records_unstored_at_stop) and, when it came from capture, sent again at the next
          start.
Rollups:  on SQLite, rows are stored without adding them to the rollup tables while records
          keep coming (the summary views add such rows themselves: pipeline/audit/store.py,
          0009); once nothing has come for ROLLUP_QUIET_S, persist adds them, a commit's
          worth per tick (rows_rolled_up; rollup_lag: how many wait). A late-allow's batch,
          or more than ROLLUP_LAG_MAX rows waiting, adds them at once.
Retention: with SLUICE_RETENTION_DAYS, rows older than that are deleted in small batches
          while nothing waits to be committed (rows_pruned; pipeline/audit/retention.py).

Example:  SLUICE_DB=sqlite:////var/lib/sluice/audit.db sluice run persist
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from .. import private
from ..audit.records import AuditEvent, AuditLogger, new_event_id
from ..errors import StoreError
from ..events import DeliveredDestination
from ..journal import Acks, JournalError
from ..loop import BaseStage, StageIO, run_stage
from ..audit.retention import Retention
from ..settings import Settings
from ..audit.store import AuditStore, StoreRejected
from ..topology import wiring_text

# Records per SQL transaction, in units of SLUICE_BATCH_MAX (512 -> 8192). Under a flood the
# cost of a commit is the index pages it rewrites, nearly as many for 2,048 rows as for 8,192:
# benchmarks/persist_throughput.py measures about 1.3x the rows/s at 8,192. One such commit
# takes about 0.1 s, so stop and SIGHUP are still handled promptly.
COMMIT_FACTOR = 16
DELIVERED_CHUNK = 4096     # notify's delivered destinations stored per tick
DELIVERED_HELD = 200_000   # ... and held at most, waiting for the database
# Rows wait for the rollups until records stop coming for this long: a flood's rows are
# stored at the rate of the rows alone, and the rollups catch up when it ends.
ROLLUP_QUIET_S = 0.5
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0


JSONL_MARK = "jsonl.last"  # in SLUICE_JOURNAL_DIR: it outlives a reboot, as the file does


class JsonlMark:
    """The event id of the last line persist wrote to the JSONL file, kept beside the
    journal: what the catch-up starts after when the file itself has no line to go by.
    START means before every row: no line was written yet, so every row belongs in it."""

    START = "-"

    def __init__(self, path: Path, gid: int | None) -> None:
        self.path, self.gid = path, gid

    def read(self) -> str:
        try:
            return self.path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return ""

    def write(self, event_id: str) -> bool:
        """False when the disk refuses it (the caller counts it; the file is what counts)."""
        temporary = self.path.with_suffix(".tmp")
        try:
            private.create_file(temporary, self.gid)
            temporary.write_text(event_id)
            os.replace(temporary, self.path)
        except OSError:
            return False
        return True

class _Retry:
    """Backoff for one kind of write; logs each distinct error once, and the recovery."""

    def __init__(self, what: str, counter: str, io: StageIO) -> None:
        self.what, self.counter, self.io = what, counter, io
        self.next_at = 0.0
        self.delay = 0.0
        self.failures = 0
        self.logged: set[str] = set()

    def failed(self, now: float, err: StoreError) -> None:
        self.io.counters.add(self.counter)
        self.failures += 1
        if str(err) not in self.logged:
            self.logged.add(str(err))
            self.io.log.warning("%s failed, records kept and retried: %s", self.what, err)
        self.delay = min(RETRY_MAX_S, max(RETRY_FIRST_S, self.delay * 2))
        self.next_at = now + self.delay

    def succeeded(self) -> None:
        if self.failures:
            self.io.log.info("%s works again after %d failed attempt(s)", self.what, self.failures)
        self.next_at, self.delay, self.failures = 0.0, 0.0, 0
        self.logged.clear()


@dataclasses.dataclass
class _Progress:
    handled: int = 0  # a prefix of the batch: stored, skipped as duplicates or rejected
    stored: list[AuditEvent] = dataclasses.field(default_factory=list)


class PersistStage(BaseStage):
    name = "persist"
    store: AuditStore    # the two outputs, opened by setup()
    logger: AuditLogger

    def __init__(self, *, clock: Callable[[], int] = time.time_ns) -> None:
        self.clock = clock
        self.opened = contextlib.ExitStack()  # what setup() opened, for teardown to close
        self.storing = False  # setup() opened both outputs: teardown stores what is left
        self.retention: Retention | None = None
        self.pending: list[AuditEvent] = []      # received, not yet committed to SQL
        self.unjournaled: list[AuditEvent] = []  # committed to SQL, not yet in the JSONL file
        self.delivered: list[DeliveredDestination] = []  # notify's, not yet stored
        self.pending_since: float | None = None
        self.complaints: set[str] = set()
        self.acks: Acks | None = None
        self.to_ack: list[tuple[str, int]] = []  # handled journal records, marked once on disk
        self.received_at = 0.0   # the last tick that found records received
        self.rollup_lag = 0      # rows stored that the rollups do not count yet

    def setup(self, io: StageIO) -> None:
        self.io = io
        settings = io.settings
        self.host = settings.host_name
        self.commit_rows = settings.batch_max * COMMIT_FACTOR
        self.sql_retry = _Retry("SQL write", "store_errors", io)
        self.jsonl_retry = _Retry("JSONL write", "jsonl_errors", io)
        self.delivered_retry = _Retry("delivered destinations write", "store_errors", io)
        self.store = AuditStore(settings.db, gid=settings.gid, defer_rollups=True)
        self.opened.callback(self.store.close)
        applied = self.store.migrate()
        self.rollup_retry = _Retry("rollup catch-up", "store_errors", io)
        self.rollup_lag = self.store.rollup_lag()  # a previous run's rows come first
        self.logger = AuditLogger(settings.audit_log, settings.audit_mode, clock=self.clock,
                                  gid=settings.gid)
        self.opened.callback(self.logger.close)
        self.storing = True
        self.retention = (Retention(settings.retention_days, self.clock)
                          if settings.retention_days else None)
        self.ack_retry = _Retry("journal acknowledgement", "ack_errors", io)
        self.jsonl_mark = JsonlMark(settings.journal_dir / JSONL_MARK, settings.gid)
        self._catch_up_jsonl()
        io.bind_inboxes()
        io.ready = True
        io.log.info("storing audit records in %s (%s), JSONL %s; %s",
                    self.store.url,
                    f"applied {', '.join(applied)}" if applied else "schema up to date",
                    settings.audit_log or "off", wiring_text(self.name))

    # ------------------------------------------------------------- receiving

    def handle(self, inbox: str, kind: str, records: list) -> None:
        if kind == "delivered_destinations":
            self._keep_delivered(records)
            return
        now_ns = self.clock()
        for record in records:  # in range: the loop checked them on receipt
            if not record.timestamp:
                record.timestamp = now_ns
            if not record.host:
                record.host = self.host
            if not record.event_id:
                record.event_id = new_event_id(now_ns)
            self.pending.append(record)

    def accepting(self) -> bool:
        return len(self.pending) + len(self.unjournaled) < self.commit_rows

    def _keep_delivered(self, records: list[DeliveredDestination]) -> None:
        room = DELIVERED_HELD - len(self.delivered)
        self.delivered += records[:room]
        self.io.counters.add("delivered_dropped", len(records) - len(records[:room]))

    def _reject(self, reason: str) -> None:
        self.io.counters.add("records_rejected")
        if reason not in self.complaints:
            self.complaints.add(reason)
            self.io.log.warning("skipping audit record: %s (counted, logged once)", reason)

    def _catch_up_jsonl(self) -> None:
        """Append the rows a crash left in SQL without their JSONL lines: those after the
        file's last line or, when the file has none (a crash before its first line, or a
        file logrotate just started), after the last line persist ever wrote."""
        if self.logger.path is None:
            return
        last = self.logger.last_event_id() or self.jsonl_mark.read()
        try:
            if not last:
                self._start_mark()
                return
            missing = self.store.events_after(None if last == JsonlMark.START else last,
                                              self.host)
        except StoreError as err:
            self.io.log.warning("cannot compare %s with the database: %s", self.logger.path, err)
            return
        if missing:
            self.unjournaled.extend(missing)
            self.io.counters.add("jsonl_caught_up", len(missing))
            self.io.log.warning("%d row(s) were in SQL but not in %s (a crash between the two "
                                "writes): appending them", len(missing), self.logger.path)

    def _start_mark(self) -> None:
        """No line and no mark: a first start, or a store older than the mark. Mark the last
        row stored now, before this run commits any, so a crash before this run's first line
        is caught up; rows from before are taken to be in the file already (never appended
        twice)."""
        last = self.store.last_event_id(self.host) or JsonlMark.START
        if not self.jsonl_mark.write(last):
            self.io.counters.add("jsonl_mark_errors")

    # ------------------------------------------------------------- storing

    def tick(self, now: float) -> None:
        if self.pending and self.pending_since is None:
            self.pending_since = now
        if self.pending:
            self.received_at = now
        if self._commit_due(now):
            self._commit_all(now)
        if self.unjournaled and now >= self.jsonl_retry.next_at:
            self._journal(now)
        if self.retention is not None and not self.pending:
            self._retain(self.retention, now)
        if self.to_ack and not self.unjournaled and now >= self.ack_retry.next_at:
            self._acknowledge(now)
        if self.delivered and not self.pending and now >= self.delivered_retry.next_at:
            self._store_delivered(now)
        if (self.rollup_lag and not self.pending and now - self.received_at >= ROLLUP_QUIET_S
                and now >= self.rollup_retry.next_at):
            self._catch_up_rollups(now)
        self.io.counters.level("records_held", len(self.pending) + len(self.unjournaled))
        self.io.counters.level("rollup_lag", self.rollup_lag)

    def _catch_up_rollups(self, now: float) -> None:
        """Add a commit's worth of the rows the rollups lack; one transaction per tick, so
        records that arrive meanwhile wait for one at most."""
        try:
            added = self.store.catch_up(self.commit_rows)
            if added < self.commit_rows:  # done; and an import may have added rows too
                self.rollup_lag = self.store.rollup_lag()
            else:
                self.rollup_lag = max(0, self.rollup_lag - added)
        except StoreError as err:
            self.rollup_retry.failed(now, err)
            return
        self.io.counters.add("rows_rolled_up", added)
        self.rollup_retry.succeeded()

    def _commit_due(self, now: float) -> bool:
        if not self.pending or now < self.sql_retry.next_at:
            return False
        assert self.pending_since is not None, "tick() noted when records became pending"
        return (len(self.pending) >= self.commit_rows
                or now - self.pending_since >= self.io.settings.flush_interval)

    def _commit_all(self, now: float) -> None:
        """Commit everything pending, in batches, until the database fails."""
        while self.pending:
            progress = _Progress()
            try:
                self._store(self.pending[:self.commit_rows], progress)
            except StoreError as err:
                self.sql_retry.failed(now, err)
                return
            finally:
                del self.pending[:progress.handled]
                self.unjournaled.extend(progress.stored)
        self.sql_retry.succeeded()
        self.pending_since = None

    def _store(self, batch: list[AuditEvent], progress: _Progress) -> None:
        """Insert batch; a row the database refuses is found by halving and rejected alone."""
        try:
            stored = self.store.insert(batch)
        except StoreRejected as err:
            if len(batch) == 1:
                self._reject(f"refused by the database: {err}")
                progress.handled += 1
                if batch[0].seq:
                    self.to_ack.append((batch[0].event_id, batch[0].seq))
                return
            middle = len(batch) // 2
            self._store(batch[:middle], progress)  # left first: handled stays a prefix
            self._store(batch[middle:], progress)
            return
        progress.handled += len(batch)
        progress.stored.extend(stored)
        if self.store.defer_rollups:  # as the write left it, past ROLLUP_LAG_MAX too
            self.rollup_lag = self.store.written_lag
        # Stored now or before (a record sent again): either way done once JSONL has it.
        self.to_ack.extend((r.event_id, r.seq) for r in batch if r.seq)
        self.io.counters.add("rows_inserted", len(stored))
        self.io.counters.add("duplicates_skipped", len(batch) - len(stored))

    def _retain(self, retention: Retention, now: float) -> None:
        try:
            rows, summary = retention.step(self.store, now)
        except StoreError as err:
            self.io.log.warning("%s (retention tries again in an hour)", err)
            return
        self.io.counters.add("rows_pruned", rows)
        if summary:
            self.io.log.info("%s", summary)

    def _store_delivered(self, now: float) -> None:
        """notify's delivered destinations, a chunk per tick once the audit records are
        committed: they never hold up the audit writes."""
        chunk = self.delivered[:DELIVERED_CHUNK]
        try:
            self.store.remember_delivered(chunk)
        except StoreError as err:
            self.delivered_retry.failed(now, err)
            return
        del self.delivered[:len(chunk)]
        self.io.counters.add("delivered_stored", len(chunk))
        self.delivered_retry.succeeded()

    def _journal(self, now: float) -> None:
        """Append what SQL holds and the file lacks, until the file fails."""
        while self.unjournaled:
            chunk = self.unjournaled[:self.commit_rows]
            try:
                self.logger.write(chunk)
            except StoreError as err:
                self.jsonl_retry.failed(now, err)
                return
            del self.unjournaled[:len(chunk)]
            self.io.counters.add("records_stored", len(chunk))
            if not self.jsonl_mark.write(chunk[-1].event_id):
                self.io.counters.add("jsonl_mark_errors")
        self.jsonl_retry.succeeded()

    def _acknowledge(self, now: float) -> None:
        """Mark in the journal's bitmaps what SQL and JSONL both hold now."""
        if self.acks is None:
            self.acks = Acks.open(self.io.settings.journal_dir)
            if self.acks is None:
                return  # no journal yet: capture has not started; try again later
        self.acks.mark_all(self.to_ack)
        try:
            self.acks.flush()
        except JournalError as err:
            self.ack_retry.failed(now, err)  # marked in memory; written on the next try
            self.to_ack.clear()
            return
        self.io.counters.add("records_acknowledged", len(self.to_ack))
        self.to_ack.clear()
        self.ack_retry.succeeded()

    # ------------------------------------------------------------- signals and stop

    def hangup(self) -> None:
        if self.logger.path is None:
            return
        try:
            self.logger.reopen()
            self.io.log.info("reopened %s", self.logger.path)
        except StoreError as err:
            # write() opens it again on its next attempt; until then records wait.
            self.io.counters.add("jsonl_errors")
            self.io.log.warning("%s", err)

    def teardown(self) -> None:
        """Store what was received before the stop: one last attempt, losses counted."""
        with self.opened:  # then the JSONL file and the store are closed
            if self.storing:
                now = time.monotonic()
                self._commit_all(now)
                self._journal(now)
                while self.delivered and now >= self.delivered_retry.next_at:
                    self._store_delivered(now)
                self.io.counters.add("delivered_dropped", len(self.delivered))
                if not self.unjournaled:
                    self._acknowledge(now)
                left = len(self.pending) + len(self.unjournaled)
                if left:
                    self.io.counters.add("records_unstored_at_stop", left)
                    self.io.log.error("%d record(s) could not be stored before the stop "
                                      "(counted as records_unstored_at_stop; those from "
                                      "capture's journal come again at the next start)", left)


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(PersistStage(), settings, ctx=ctx, stop=stop)
