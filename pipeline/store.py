"""The SQL audit store: its tables, its migrations, the one writer and read-only readers.

SQLAlchemy Core only, on SQLite (the default; WAL, so readers never block the writer) or
PostgreSQL (a fleet writing to one database). Table `audit_events` holds one row per audit
record, columns named after the JSON fields:

* `timestamp` is text in the fixed-width form of audit.sql_timestamp, which sorts as time on
  both databases and reads the same in every client.
* Empty values are stored as the record has them, never as NULL: "" for text, 0 for numbers,
  and "" for an empty `cname_chain` (a JSON array otherwise), so queries never need IS NULL.
* `event_id` is unique: writing a batch again inserts nothing twice.

Schema changes are MIGRATIONS: named, applied in order, each in its own transaction (SQLite
DDL included), recorded in `schema_migrations`; a failure stops the caller with StoreError.
Append new ones at the end; never edit or reorder applied ones.

The same migrations run on PostgreSQL, where many hosts write to one database: `host` tells
them apart, and every view groups by it. A `postgresql://` URL uses psycopg 3.

Views (README "Views"): `audit_events_classified` is every row plus `destination`,
`superseded` and `counted_block`; `blocked_destinations`, `process_activity`,
`dns_blocked_names`, `late_allowed` and `timeline` summarize it. A connection_blocked row is
superseded, and not counted as a block, when a connection_late_allowed row of the same host,
dst_ip, dst_port and protocol has a timestamp at or after its own (reference §2.8).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .audit import AuditEvent, sql_timestamp
from .errors import StoreError

metadata = sa.MetaData()

audit_events = sa.Table(
    "audit_events", metadata,
    # SQLite makes only an INTEGER PRIMARY KEY the rowid; PostgreSQL gets a 64-bit key.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("event_id", sa.Text, nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("timestamp", sa.Text, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("src_ip", sa.Text, nullable=False),
    sa.Column("dst_ip", sa.Text, nullable=False),
    sa.Column("dst_hostname", sa.Text, nullable=False),
    sa.Column("dst_port", sa.Integer, nullable=False),
    sa.Column("protocol", sa.Text, nullable=False),
    sa.Column("process", sa.Text, nullable=False),
    sa.Column("pid", sa.BigInteger, nullable=False),
    sa.Column("matched_rule", sa.Text, nullable=False),
    sa.Column("auto_allowed_type", sa.Text, nullable=False),
    sa.Column("cname_chain", sa.Text, nullable=False),
    sa.Column("mid_stream", sa.Boolean, nullable=False),
    sa.Column("would_deny", sa.Boolean, nullable=False),
    sa.Column("blocked", sa.Boolean, nullable=False),
    sa.Column("packets", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("event_id", name="uq_audit_events_event_id"),
    sa.Index("ix_audit_events_timestamp", "timestamp"),
    sa.Index("ix_audit_events_event_type", "event_type"),
    sa.Index("ix_audit_events_dst_ip", "dst_ip"),
)

schema_migrations = sa.Table(
    "schema_migrations", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("applied_at", sa.Text, nullable=False),
)

# notify's memory of the destinations it has alerted on, per host (a fleet shares one
# store); notify is the only writer of this table and reads nothing else.
notified_destinations = sa.Table(
    "notified_destinations", metadata,
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("destination", sa.Text, primary_key=True),  # `<hostname or ip>:<port>`
    sa.Column("hostname", sa.Text, nullable=False),
    sa.Column("ip", sa.Text, nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("protocol", sa.Text, nullable=False),
    sa.Column("first_seen", sa.Text, nullable=False),
    sa.Column("delivered_at", sa.Text, nullable=False),
)

# The insert's columns, in the order as_row builds its tuples.
COLUMNS = tuple(c.name for c in audit_events.columns if c.name != "id")


def _create_audit_events(conn: sa.Connection) -> None:
    # A later migration that alters this table must give this one a frozen copy of the
    # table as first defined, so a new database still replays every step in order.
    audit_events.create(conn)


def _create_fleet_indexes(conn: sa.Connection) -> None:
    # Per-host questions on a fleet store; and the supersede test, which looks only at the
    # (few) late-allowed rows: a partial index holds just those.
    # Plain DDL: an sa.Index on audit_events would join the table's own definition, which
    # 0001 creates.
    conn.exec_driver_sql("CREATE INDEX ix_audit_events_host_timestamp "
                         "ON audit_events (host, timestamp)")
    conn.exec_driver_sql("CREATE INDEX ix_audit_events_late_allowed "
                         "ON audit_events (host, dst_ip, dst_port, protocol, timestamp) "
                         "WHERE event_type = 'connection_late_allowed'")


def _process_list(dialect: str, column: str) -> str:
    """Distinct non-empty process names of a group, comma-separated and sorted."""
    if dialect == "postgresql":
        return f"string_agg(DISTINCT NULLIF({column}, ''), ',' ORDER BY NULLIF({column}, ''))"
    # SQLite 3.40 has no ORDER BY inside aggregates: the views feed each group its rows
    # sorted by process (an ordered subquery, which SQLite does not flatten into a GROUP BY).
    return f"group_concat(DISTINCT NULLIF({column}, ''))"


def _view_statements(dialect: str) -> list[str]:
    # Written once for both databases; `b.*` is expanded when the view is created, so a
    # migration that adds a column to audit_events recreates these views.
    processes = _process_list(dialect, "process")
    allowed = ("CASE WHEN event_type IN ('connection_allowed', 'connection_late_allowed') "
               "THEN 1 ELSE 0 END")
    return [
        # A block is superseded when some late-allow of its key is at or after it, that is
        # when the latest one is: one join with the (few) late-allow keys, not a probe per row.
        """CREATE VIEW audit_events_classified AS
        SELECT b.*,
               CASE WHEN b.dst_hostname <> '' THEN b.dst_hostname ELSE b.dst_ip END
                   AS destination,
               CASE WHEN b.event_type = 'connection_blocked' AND l.last_late >= b.timestamp
                   THEN 1 ELSE 0 END AS superseded
        FROM audit_events AS b
        LEFT JOIN (SELECT host, dst_ip, dst_port, protocol, MAX(timestamp) AS last_late
                   FROM audit_events WHERE event_type = 'connection_late_allowed'
                   GROUP BY host, dst_ip, dst_port, protocol) AS l
          ON l.host = b.host AND l.dst_ip = b.dst_ip AND l.dst_port = b.dst_port
             AND l.protocol = b.protocol""",
        # counted_block in a second step, so the supersede test is written once.
        """CREATE VIEW audit_events_counted AS
        SELECT c.*,
               CASE WHEN c.event_type = 'protocol_blocked' OR (
                   c.event_type = 'connection_blocked' AND c.superseded = 0)
                   THEN 1 ELSE 0 END AS counted_block
        FROM audit_events_classified AS c""",
        f"""CREATE VIEW blocked_destinations AS
        SELECT host, destination, port, protocol, COUNT(*) AS attempts,
               MIN(timestamp) AS first_seen, MAX(timestamp) AS last_seen,
               {processes} AS processes
        FROM (SELECT host, destination, dst_port AS port, protocol, timestamp, process
              FROM audit_events_counted WHERE counted_block = 1
              ORDER BY host, destination, dst_port, protocol, process) AS b
        GROUP BY host, destination, port, protocol""",
        f"""CREATE VIEW process_activity AS
        SELECT host, process, COUNT(*) AS events, SUM({allowed}) AS allowed,
               SUM(counted_block) AS blocked,
               SUM(CASE WHEN event_type = 'connection_late_allowed' THEN 1 ELSE 0 END)
                   AS late_allowed,
               COUNT(DISTINCT destination) AS destinations,
               MIN(timestamp) AS first_seen, MAX(timestamp) AS last_seen
        FROM audit_events_counted
        WHERE event_type IN ('connection_allowed', 'connection_late_allowed',
                             'connection_blocked', 'protocol_blocked')
        GROUP BY host, process""",
        """CREATE VIEW dns_blocked_names AS
        SELECT host, dst_hostname AS name, COUNT(*) AS attempts,
               MIN(timestamp) AS first_seen, MAX(timestamp) AS last_seen
        FROM audit_events WHERE event_type = 'dns_blocked'
        GROUP BY host, dst_hostname""",
        f"""CREATE VIEW late_allowed AS
        SELECT host, destination, dst_ip, port, protocol, matched_rule,
               COUNT(*) AS late_allows, MIN(timestamp) AS first_seen,
               MAX(timestamp) AS last_seen, {processes} AS processes
        FROM (SELECT host, destination, dst_ip, dst_port AS port, protocol, matched_rule,
                     timestamp, process
              FROM audit_events_classified WHERE event_type = 'connection_late_allowed'
              ORDER BY host, destination, dst_ip, dst_port, protocol, matched_rule,
                       process) AS l
        GROUP BY host, destination, dst_ip, port, protocol, matched_rule""",
        f"""CREATE VIEW timeline AS
        SELECT host, substr(timestamp, 1, 16) || 'Z' AS minute, COUNT(*) AS events,
               SUM({allowed}) AS allowed, SUM(counted_block) AS blocked,
               SUM(superseded) AS superseded,
               SUM(CASE WHEN event_type = 'connection_late_allowed' THEN 1 ELSE 0 END)
                   AS late_allowed,
               SUM(CASE WHEN event_type = 'dns_blocked' THEN 1 ELSE 0 END) AS dns_blocked
        FROM audit_events_counted
        GROUP BY host, substr(timestamp, 1, 16)""",
    ]


def _create_views(conn: sa.Connection) -> None:
    for statement in _view_statements(conn.dialect.name):
        conn.exec_driver_sql(statement)


VIEWS = ("audit_events_classified", "audit_events_counted", "blocked_destinations",
         "process_activity", "dns_blocked_names", "late_allowed", "timeline")

Migration = tuple[str, Callable[[sa.Connection], None]]
MIGRATIONS: tuple[Migration, ...] = (
    ("0001_audit_events", _create_audit_events),
    ("0002_fleet_indexes", _create_fleet_indexes),
    ("0003_views", _create_views),
    ("0004_notified_destinations", lambda conn: notified_destinations.create(conn)),
)

BUSY_TIMEOUT_MS = 1000  # short: a stopping persist must finish within honcho's 5 seconds
_INSERTS = {"sqlite": sqlite_dialect.insert, "postgresql": pg_dialect.insert}
_ID_CHUNK = 500  # ids per IN (...) when looking for already stored records


class StoreRejected(StoreError):
    """The database refuses the data itself: retrying the same rows cannot help."""


def _one_line(err: BaseException) -> str:
    inner = getattr(err, "orig", None) or err  # the driver's message, without SQL and links
    return " ".join(str(inner).split()) or type(inner).__name__


# ---------------------------------------------------------------- engines

def _sqlite_file(url: sa.URL) -> Path | None:
    """The database file of a SQLite URL, or None for memory and URI forms."""
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def _sqlite_events(engine: sa.Engine, *, begin: str, pragmas: Sequence[str]) -> None:
    @sa_event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy's BEGIN below, not the driver, start transactions: the driver
        # would leave DDL outside them and migrations would not be atomic.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @sa_event.listens_for(engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql(begin)


def _postgresql_read_only_sessions(engine: sa.Engine) -> None:
    @sa_event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, _record) -> None:
        # Read-only for the whole session, not only the transaction SQLAlchemy begins: a
        # statement that commits and goes on ("...; COMMIT; DELETE ...") stays read-only.
        with dbapi_conn.cursor() as cursor:
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            # The views' cost estimates on a large store start JIT compilation, which then
            # takes longer than the query itself (measured: benchmarks/query_views.py).
            cursor.execute("SET jit = off")
        dbapi_conn.commit()


def _engine(url_text: str, *, readonly: bool, busy_timeout_ms: int) -> tuple[sa.Engine, str]:
    """Create an engine and connect once, so every open problem surfaces here as StoreError."""
    try:
        url = sa.make_url(url_text)
    except sa.exc.ArgumentError:
        raise StoreError(f"not a database URL: {url_text!r}") from None
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    if backend not in _INSERTS:
        raise StoreError(f"{shown}: unsupported database {backend!r} (use sqlite or postgresql)")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # SQLAlchemy would pick psycopg2
    path = _sqlite_file(url) if backend == "sqlite" else None
    if path is not None:
        url = _prepare_sqlite_path(url, path, readonly, shown)
    try:
        engine = sa.create_engine(url, pool_pre_ping=backend != "sqlite")
    except ImportError as err:
        raise StoreError(f"{shown}: database driver not installed ({err})") from None
    except sa.exc.ArgumentError as err:
        raise StoreError(f"{shown}: {_one_line(err)}") from None
    if backend == "sqlite":
        pragmas = [f"PRAGMA busy_timeout={int(busy_timeout_ms)}"]
        if readonly:
            pragmas.append("PRAGMA query_only=ON")  # also refuses writes to attached files
        else:
            # A 64 MiB page cache keeps the indexes' hot pages in memory under a flood.
            pragmas += ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL",
                        "PRAGMA cache_size=-65536"]
        _sqlite_events(engine, begin="BEGIN" if readonly else "BEGIN IMMEDIATE", pragmas=pragmas)
    elif readonly:
        _postgresql_read_only_sessions(engine)
        engine = engine.execution_options(postgresql_readonly=True)
    _check(engine, backend, path, readonly, shown)
    return engine, shown


def _prepare_sqlite_path(url: sa.URL, path: Path, readonly: bool, shown: str) -> sa.URL:
    if readonly:
        # mode=ro: the driver itself refuses writes, and a missing file is an error.
        uri = "file:" + urllib.parse.quote(os.path.abspath(path))
        return url.set(database=uri, query={"mode": "ro", "uri": "true"})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"{shown}: cannot create {path.parent}: {err.strerror or err}") from None
    return url


def _check(engine: sa.Engine, backend: str, path: Path | None, readonly: bool,
           shown: str) -> None:
    try:
        with engine.connect() as conn:
            if backend != "sqlite":
                conn.exec_driver_sql("SELECT 1")
                return
            # Reading the schema is what finds a file that is not a database.
            conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar()
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    except (sa.exc.SQLAlchemyError, sqlite3.Error) as err:
        engine.dispose()
        raise StoreError(f"cannot open {shown}: {_one_line(err)}") from None
    if path is not None and not readonly and mode != "wal":
        engine.dispose()
        raise StoreError(f"cannot open {shown}: journal mode is {mode}, WAL is needed")


def open_readonly(url: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sa.Engine:
    """An engine for query tools; the database refuses any write through it."""
    return _engine(url, readonly=True, busy_timeout_ms=busy_timeout_ms)[0]


# ---------------------------------------------------------------- the writer

def as_row(e: AuditEvent) -> tuple:
    """The audit_events values of one record, in COLUMNS order."""
    # Values are already what every driver takes (str, int, bool): passing them through
    # Connection.execute's per-value bind processing halves the insert rate.
    return (e.event_id, e.host, sql_timestamp(e.timestamp), e.event_type, e.src_ip, e.dst_ip,
            e.dst_hostname, e.dst_port, e.protocol, e.process, e.pid, e.matched_rule,
            e.auto_allowed_type,
            json.dumps(e.cname_chain, ensure_ascii=False, separators=(",", ":"))
            if e.cname_chain else "",
            e.mid_stream, e.would_deny, e.blocked, e.packets)


# PostgreSQL takes a batch fastest as COPY into a scratch table that every commit empties,
# then one INSERT ... SELECT that skips stored ids: about 1.8x the rows/s of executemany with
# 8,192-row batches (benchmarks/replay_throughput.py shows the end-to-end effect).
_QUOTED = ", ".join(f'"{c}"' for c in COLUMNS)
_SCRATCH_SQL = ("CREATE TEMP TABLE IF NOT EXISTS incoming_audit_events ON COMMIT DELETE ROWS "
                f"AS SELECT {_QUOTED} FROM audit_events WITH NO DATA")
_COPY_SQL = f"COPY incoming_audit_events ({_QUOTED}) FROM STDIN"
_MOVE_SQL = (f"INSERT INTO audit_events ({_QUOTED}) SELECT {_QUOTED} FROM incoming_audit_events "
             "ON CONFLICT (event_id) DO NOTHING")


def _copy_insert(conn: sa.Connection, rows: list[tuple]) -> int:
    """Insert rows on PostgreSQL in the connection's transaction; returns the rows inserted."""
    import psycopg

    conn.exec_driver_sql(_SCRATCH_SQL)
    try:
        with conn.connection.dbapi_connection.cursor() as cursor:
            with cursor.copy(_COPY_SQL) as copy:
                for row in rows:
                    copy.write_row(row)
    except psycopg.OperationalError as err:
        raise StoreError(f"PostgreSQL: {_one_line(err)}") from None
    except psycopg.Error as err:  # raw driver errors: SQLAlchemy does not wrap a COPY
        raise StoreRejected(f"PostgreSQL: {_one_line(err)}") from None
    return conn.exec_driver_sql(_MOVE_SQL).rowcount


class AuditStore:
    """The single writer of audit_events: batched inserts, one transaction per batch."""

    def __init__(self, url: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.engine, self.url = _engine(url, readonly=False, busy_timeout_ms=busy_timeout_ms)
        dialect = self.engine.dialect
        insert = _INSERTS[dialect.name](audit_events).on_conflict_do_nothing(
            index_elements=["event_id"])
        compiled = insert.compile(dialect=dialect, column_keys=list(COLUMNS))
        if compiled.positional and list(compiled.positiontup) != list(COLUMNS):
            raise StoreError(f"{self.url}: unexpected parameter order from {dialect.name}")
        self._insert_sql = compiled.string
        self._positional = compiled.positional
        self._copy = dialect.name == "postgresql"

    def migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
        """Apply the migrations this database lacks, in order; returns their names."""
        try:
            with self.engine.begin() as conn:
                schema_migrations.create(conn, checkfirst=True)
                applied = set(conn.execute(sa.select(schema_migrations.c.name)).scalars())
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: cannot read schema_migrations: "
                             f"{_one_line(err)}") from None
        unknown = applied - {name for name, _ in migrations}
        if unknown:
            raise StoreError(f"{self.url} has migrations this sluice does not know "
                             f"({', '.join(sorted(unknown))}): upgrade sluice")
        done = []
        for name, step in migrations:
            if name not in applied:
                self._apply(name, step)
                done.append(name)
        return done

    def _apply(self, name: str, step: Callable[[sa.Connection], None]) -> None:
        try:
            with self.engine.begin() as conn:
                step(conn)
                conn.execute(schema_migrations.insert().values(
                    name=name, applied_at=sql_timestamp(time.time_ns())))
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: migration {name} failed: {_one_line(err)}") from None

    def write(self, events: Sequence[AuditEvent]) -> int:
        """Insert a batch; returns the number of rows inserted (duplicates are skipped)."""
        return len(self.insert(events))

    def insert(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        """Insert a batch in one transaction; returns the events that became new rows.

        StoreRejected if the database refuses a value, StoreError if it is unavailable
        (locked, disk full, connection lost): nothing of the batch is stored then.
        """
        if not events:
            return []
        try:
            with self.engine.connect() as conn:
                with conn.begin() as tx:
                    if self._execute(conn, list(map(as_row, events))) == len(events):
                        return list(events)
                    tx.rollback()
                # Some ids are stored already (a batch written again): insert only the
                # others, so the caller learns exactly which records are new rows.
                with conn.begin():
                    fresh = self._unstored(conn, events)
                    self._execute(conn, list(map(as_row, fresh)))
                    return fresh
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as err:
            raise StoreError(f"{self.url}: {_one_line(err)}") from None
        except (sa.exc.SQLAlchemyError, ValueError, OverflowError) as err:
            # Integrity and data errors, and values the driver cannot bind.
            raise StoreRejected(f"{self.url}: {_one_line(err)}") from None

    def _execute(self, conn: sa.Connection, rows: list[tuple]) -> int:
        if not rows:
            return 0
        if self._copy:
            return _copy_insert(conn, rows)
        params = rows if self._positional else [dict(zip(COLUMNS, row)) for row in rows]
        return conn.exec_driver_sql(self._insert_sql, params).rowcount

    @staticmethod
    def _unstored(conn: sa.Connection, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        ids = [e.event_id for e in events]
        seen: set[str] = set()
        column = audit_events.c.event_id
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = ids[start:start + _ID_CHUNK]
            seen.update(conn.execute(sa.select(column).where(column.in_(chunk))).scalars())
        fresh = []
        for e in events:
            if e.event_id not in seen:  # also drops a repeat of an id within the batch
                seen.add(e.event_id)
                fresh.append(e)
        return fresh

    def close(self) -> None:
        self.engine.dispose()
