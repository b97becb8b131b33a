"""The SQL store on real SQLite files: migrations, rows, duplicates, WAL, read-only, errors."""

import contextlib
import gc
import json
import sqlite3
import subprocess
import sys

import msgspec
import pytest
import sqlalchemy as sa

from pipeline.audit.records import (AuditEvent, AuditLogger, collector_paused, new_event_id,
                                    parse_timestamp)
from pipeline.errors import StoreError
from pipeline.events import DeliveredDestination
from pipeline.audit.store import (MIGRATIONS, AuditStore, StoreRejected, audit_events,
                                  open_readonly, schema_migrations)

T0 = 1_767_225_600_123_456_789


def url(path):
    return f"sqlite:///{path}"


@pytest.fixture
def db(tmp_path):
    return tmp_path / "data" / "audit.db"


@pytest.fixture
def store(db):
    s = AuditStore(url(db))
    s.migrate()
    yield s
    s.close()


@contextlib.contextmanager
def wal_limited(db, limit):
    """A store whose WAL may grow to limit bytes, and its WAL file."""
    store = AuditStore(url(db), wal_limit_bytes=limit)
    store.migrate()
    try:
        yield store, db.parent / "audit.db-wal"
    finally:
        store.close()


def events(n, start=0, **fields):
    return [AuditEvent(**{"timestamp": T0 + i, "event_type": "connection_blocked",
                          "src_ip": "10.0.0.2", "dst_ip": f"1.2.3.{i % 250}", "dst_port": 443,
                          "protocol": "TCP", "process": "curl", "pid": 100 + i,
                          "event_id": new_event_id(T0 + i), "host": "h", **fields})
            for i in range(start, start + n)]


def without_seq(event):
    """A record's stored fields: the journal number is not kept in the row."""
    return {k: v for k, v in msgspec.structs.asdict(event).items() if k != "seq"}


def stored(db):
    """Every row as a dict of AuditEvent fields, read through the read-only opener."""
    engine = open_readonly(url(db))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(audit_events).order_by(audit_events.c.id)).mappings()
            return [{**{k: v for k, v in row.items() if k != "id"},
                     "timestamp": parse_timestamp(row["timestamp"]),
                     "cname_chain": json.loads(row["cname_chain"] or "[]")} for row in rows]
    finally:
        engine.dispose()


# ---------------------------------------------------------------- migrations

def test_migrations_are_applied_once(db):
    first = AuditStore(url(db))
    assert first.migrate() == [name for name, _ in MIGRATIONS]
    assert first.migrate() == []
    first.close()
    again = AuditStore(url(db))
    assert again.migrate() == []
    with again.engine.connect() as conn:
        names = conn.execute(sa.select(schema_migrations.c.name)).scalars().all()
    again.close()
    assert names == [name for name, _ in MIGRATIONS]


def test_a_failing_migration_is_rolled_back_and_stops_loudly(store, db):
    def broken(conn):
        conn.exec_driver_sql("CREATE TABLE half_done (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(StoreError, match="migration 0002_broken failed"):
        store.migrate([*MIGRATIONS, ("0002_broken", broken)])
    with sqlite3.connect(db) as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master")}
        names = [r[0] for r in raw.execute("SELECT name FROM schema_migrations")]
    assert "half_done" not in tables
    assert names == [name for name, _ in MIGRATIONS]


def test_a_database_from_a_newer_sluice_is_refused(store):
    store.migrate([*MIGRATIONS, ("0099_future", lambda conn: None)])
    with pytest.raises(StoreError, match="0099_future.*upgrade sluice"):
        store.migrate()


def test_later_migrations_are_appended_in_order(store):
    def add_view(conn):
        conn.exec_driver_sql("CREATE VIEW blocked AS SELECT * FROM audit_events WHERE blocked")

    assert store.migrate([*MIGRATIONS, ("0002_view", add_view)]) == ["0002_view"]
    store.write(events(3, blocked=True) + events(2, start=3))
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM blocked").scalar() == 3


# ---------------------------------------------------------------- rows

def test_rows_equal_the_records_field_by_field(store, db):
    batch = events(4)
    batch[1] = msgspec.structs.replace(batch[1], cname_chain=["a.example", "ü.example"],
                                   mid_stream=True, packets=12, matched_rule="*.example",
                                   auto_allowed_type="dns", event_type="connection_allowed")
    batch[2] = msgspec.structs.replace(batch[2], src_ip="", dst_ip="", dst_port=0, protocol="",
                                   process="", pid=0, event_type="dns_blocked",
                                   dst_hostname="evil.example", would_deny=True)
    batch[3] = msgspec.structs.replace(batch[3], blocked=True, pid=2**32 - 1, dst_port=65535)
    assert store.write(batch) == 4
    assert stored(db) == [without_seq(e) for e in batch]


def test_empty_chain_is_empty_text_and_times_are_fixed_width_text(store, db):
    store.write(events(1) + events(1, start=1, cname_chain=["x"]))
    with sqlite3.connect(db) as raw:
        rows = raw.execute("SELECT cname_chain, timestamp FROM audit_events ORDER BY id").fetchall()
    assert rows == [("", "2026-01-01T00:00:00.123456789Z"),
                    ('["x"]', "2026-01-01T00:00:00.123456790Z")]


def test_a_batch_written_again_adds_nothing(store, db):
    batch = events(10)
    assert store.write(batch) == 10
    assert store.write(batch) == 0
    assert len(stored(db)) == 10


def test_insert_returns_exactly_the_new_records_in_order(store, db):
    old, new = events(5), events(5, start=5)
    store.write(old[:3])
    mixed = [new[0], old[0], new[1], old[2], new[1], old[3], old[4]]
    assert store.insert(mixed) == [new[0], new[1], old[3], old[4]]
    assert [r["event_id"] for r in stored(db)] == [e.event_id for e in
                                                   old[:3] + [new[0], new[1], old[3], old[4]]]


def test_a_value_the_database_cannot_hold_is_rejected_not_retried(store, db):
    with pytest.raises(StoreRejected):
        store.write(events(2) + events(1, start=2, packets=2**64))
    assert stored(db) == []
    assert gc.isenabled(), "a failed batch gives the cycle collector back"


def test_a_locked_database_is_an_error_to_retry_and_stores_nothing(tmp_path, db):
    store = AuditStore(url(db), busy_timeout_ms=50)
    store.migrate()
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked") as err:
            store.write(events(3))
        assert not isinstance(err.value, StoreRejected)
        locker.execute("ROLLBACK")
        assert store.write(events(3)) == 3
    finally:
        locker.close()
        store.close()


# ---------------------------------------------------------------- connections

def test_writer_uses_wal_normal_sync_and_a_busy_timeout(store, db):
    with store.engine.connect() as conn:
        settings = [conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                    for p in ("journal_mode", "synchronous", "busy_timeout")]
    assert settings == ["wal", 1, 1000]
    with sqlite3.connect(db) as raw:  # WAL is a property of the file, seen by any client
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_wal_grown_past_its_limit_shrinks_back_and_its_thread_copies_it_again(db):
    """A reader holding the WAL (a long query during a flood) lets it grow past its limit.
    Once the reader has gone, the file shrinks back to the limit and the commits after
    leave the copying to the checkpoint thread. (Before, the file kept its largest size, and
    the writer, taking that as falling behind, checkpointed at every commit itself.)"""
    limit = 4 << 20
    with wal_limited(db, limit) as (store, wal):
        reader = sqlite3.connect(db, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM audit_events").fetchone()  # its snapshot
            start = 0
            while wal.stat().st_size <= 2 * limit:
                store.insert(events(500, start=start))
                start += 500
        finally:
            reader.close()  # (a connection's with-block ends its transaction, not itself)
        grown = wal.stat().st_size
        checkpoints_before = store._checkpointer.on_writer
        commits = 40
        for _ in range(commits):
            store.insert(events(500, start=start))
            start += 500
        assert wal.stat().st_size <= 1.5 * limit < grown
        assert store._checkpointer.on_writer - checkpoints_before <= commits // 4


def test_on_a_busy_machine_the_wal_still_starts_over_past_its_limit(db):
    """Three CPU-bound programs beside the writer, as under a flood: the checkpoint thread is
    often still copying when the writer's next transaction begins, and the WAL can start
    over only at a transaction that begins with every page copied. Once past its limit the
    writer waits for that copy and finishes it, so the file stays near the limit. (Before,
    the writer's own checkpoint gave way to the thread's pass, and here the WAL file grew to
    5.3-6.5 MB against its 2 MiB.)"""
    limit = 2 << 20
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    largest = 0
    try:
        with wal_limited(db, limit) as (store, wal):
            for n in range(120):  # new destinations, under a MiB of pages a commit
                store.insert([msgspec.structs.replace(e, dst_ip=f"10.{i >> 16 & 255}."
                                                      f"{i >> 8 & 255}.{i & 255}")
                              for i, e in enumerate(events(1000, start=n * 1000), n * 1000)])
                largest = max(largest, wal.stat().st_size)
    finally:
        for program in busy:
            program.kill()
            program.wait()
    assert largest <= 2 * limit


def test_a_storm_of_delivered_destinations_keeps_the_wal_near_its_limit(db):
    """notify's delivered destinations come in transactions of their own, thousands after a
    scan's summary, with no audit row between them: each is followed by a checkpoint as the
    audit rows' are. (Before, none was, and 60 of them grew the WAL to many times its
    limit.)"""
    limit = 2 << 20
    largest = 0
    with wal_limited(db, limit) as (store, wal):
        for chunk in range(60):
            store.remember_delivered([
                DeliveredDestination("h", f"10.9.{i >> 8 & 255}.{i & 255}:443", "",
                                     f"10.9.{i >> 8 & 255}.{i & 255}", 443, "TCP", T0, T0)
                for i in range(chunk * 1000, (chunk + 1) * 1000)])
            largest = max(largest, wal.stat().st_size)
    assert largest <= 2 * limit


def test_the_read_only_opener_reads_but_refuses_writes(store, db):
    store.write(events(2))
    engine = open_readonly(url(db))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(audit_events)).scalar() == 2
            with pytest.raises(sa.exc.OperationalError, match="readonly"):
                conn.execute(audit_events.delete())
    finally:
        engine.dispose()
    assert len(stored(db)) == 2


def test_the_read_only_opener_does_not_create_a_database(tmp_path):
    with pytest.raises(StoreError, match="cannot open"):
        open_readonly(url(tmp_path / "missing.db"))
    assert not (tmp_path / "missing.db").exists()


def test_memory_database_works_without_wal():
    store = AuditStore("sqlite://")
    store.migrate()
    assert store.write(events(2)) == 2
    store.close()


def make_locked(tmp_path):
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")  # rollback-journal mode: the lock blocks readers
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO t VALUES (1)")
    return path, holder


@pytest.mark.parametrize("case, message", [
    ("not a url", "not a database URL"),
    ("mysql://u@localhost/db", "unsupported database 'mysql'"),
    ("postgresql://u:hunter2@localhost/db", "postgresql://u:\\*\\*\\*@localhost/db"),
    ("parent-is-a-file", "cannot create"),
    ("corrupt", "file is not a database"),
    ("locked", "database is locked"),
])
def test_open_problems_are_one_line_store_errors(tmp_path, case, message):
    holder = None
    if case == "parent-is-a-file":
        (tmp_path / "f").write_text("")
        case = url(tmp_path / "f" / "audit.db")
    elif case == "corrupt":
        (tmp_path / "c.db").write_bytes(b"this is not a database file at all" * 200)
        case = url(tmp_path / "c.db")
    elif case == "locked":
        path, holder = make_locked(tmp_path)
        case = url(path)
    try:
        with pytest.raises(StoreError, match=message) as err:
            AuditStore(case, busy_timeout_ms=50)
    finally:
        if holder is not None:
            holder.close()
    assert "\n" not in str(err.value) and "hunter2" not in str(err.value)


# ---------------------------------------------------------------- batch work and the collector

@pytest.fixture
def collector_passes():
    """The generation of each cycle-collector pass that starts while the test runs."""
    passes: list[int] = []

    def note(phase, info):
        if phase == "start":
            passes.append(info["generation"])

    gc.callbacks.append(note)
    yield passes
    gc.callbacks.remove(note)


def test_writing_a_batch_leaves_out_the_collector(store, tmp_path, collector_passes):
    # A scan: every record a new destination, so every rollup group is new too.
    batch = [AuditEvent(T0 + i, "connection_blocked", "10.0.0.2", f"10.9.{i >> 8}.{i & 255}",
                        f"host{i}.example", 443, "TCP", "curl", 100, cname_chain=["a.example"],
                        event_id=new_event_id(T0 + i), host="h") for i in range(8192)]
    logger = AuditLogger(tmp_path / "audit.jsonl", audit_mode=True)
    collector_passes.clear()
    assert store.write(batch) == 8192
    logger.write(batch)
    logger.close()
    # Unpaused, the two calls start about a hundred passes; paused, at most the one pass
    # after each call that catches up on what it left.
    assert len(collector_passes) <= 2, collector_passes
    assert gc.isenabled()


def test_a_collector_the_caller_paused_stays_paused():
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("the batch failed")
    assert gc.isenabled()


# A fresh process, as persist starts: import the stage, open the store, write a batch, then
# read SQLite's own allocation count (zero when the statistics are off).
_FRESH_PERSIST = """
import ctypes, sys
BEFORE
import pipeline.stages.persist
from pipeline.audit.records import AuditEvent, new_event_id
from pipeline.audit.store import AuditStore
store = AuditStore("sqlite:///" + sys.argv[1])
store.migrate()
store.insert([AuditEvent(timestamp=10**18 + i, event_type="connection_blocked",
                         dst_ip="1.2.3.4", event_id=new_event_id(10**18 + i), host="h")
              for i in range(100)])
library = ctypes.CDLL("libsqlite3.so.0")
library.sqlite3_memory_used.restype = ctypes.c_int64
copies = {line.split()[-1] for line in open("/proc/self/maps") if "libsqlite3" in line}
print(len(copies), library.sqlite3_memory_used())
"""


@pytest.mark.parametrize("before, statistics", [("", False), ("import sqlite3", True)])
def test_persist_runs_sqlite_without_memory_statistics(tmp_path, before, statistics):
    """Counting allocations under SQLite's global mutex costs persist's insert about 8%;
    they are off when the store is opened before anything started SQLite, and on (as
    SQLite's default, working as before) when something had."""
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PERSIST.replace("BEFORE", before), str(tmp_path / "a.db")],
        capture_output=True, text=True, check=True)
    copies, used = map(int, result.stdout.split())
    assert copies == 1  # the library configured is the one the sqlite3 module uses
    assert (used > 0) is statistics
