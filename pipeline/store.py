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
from operator import itemgetter
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import msgspec
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .audit import AuditEvent, sql_timestamp
from .errors import StoreError
from .rollups import (GROUP_KEY, TIMELINE_COUNTS, Deltas, Flip, Row, aggregate, block_keys,
                      flip, latest_late_allows, total_key)

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
    # Time windows and retention. The summary views read the rollups, so since 0005 this,
    # the event_id key and ix_audit_events_blocks (created there) are all a row must update.
    sa.Index("ix_audit_events_timestamp", "timestamp"),
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

# The rollups (pipeline/rollups.py says what each holds); persist and `sluice import` keep
# them in step with audit_events in the same transaction. Counts are 64-bit; the views cast
# their sums back to BIGINT, which PostgreSQL would otherwise widen to numeric.
_NO_ROWID = {"sqlite_with_rowid": False}  # SQLite: one B-tree per table, keyed like the PK


def _counts() -> list[sa.Column]:
    return [sa.Column(name, sa.BigInteger, nullable=False) for name in TIMELINE_COUNTS]


late_keys = sa.Table(
    "late_keys", metadata,
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("dst_ip", sa.Text, primary_key=True),
    sa.Column("dst_port", sa.Integer, primary_key=True),
    sa.Column("protocol", sa.Text, primary_key=True),
    sa.Column("last_late", sa.Text, nullable=False),
    **_NO_ROWID,
)
activity_minutes = sa.Table(
    "activity_minutes", metadata,
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("minute", sa.Text, primary_key=True),  # 2026-01-01T10:00Z
    *_counts(), **_NO_ROWID,
)
activity_days = sa.Table(
    "activity_days", metadata,
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("day", sa.Text, primary_key=True),  # 2026-01-01
    *_counts(), **_NO_ROWID,
)
destination_days = sa.Table(
    "destination_days", metadata,
    *(sa.Column(name, sa.Integer if name == "dst_port" else sa.Text, primary_key=True)
      for name in GROUP_KEY),
    sa.Column("events", sa.BigInteger, nullable=False),
    sa.Column("first_seen", sa.Text, nullable=False),
    sa.Column("last_seen", sa.Text, nullable=False),
    sa.Column("counted", sa.BigInteger, nullable=False),
    sa.Column("counted_first", sa.Text),  # NULL when every row of the group is superseded
    sa.Column("counted_last", sa.Text),
    **_NO_ROWID,
)
destinations = sa.Table(
    "destinations", metadata,
    *(sa.Column(c.name, c.type, primary_key=True) for c in destination_days.primary_key
      if c.name != "day"),
    *(sa.Column(c.name, c.type, nullable=c.nullable) for c in destination_days.columns
      if not c.primary_key),
    **_NO_ROWID,
)
_TOTAL_KEY = tuple(c.name for c in destinations.primary_key)
ROLLUPS = (late_keys, activity_minutes, activity_days, destination_days, destinations)

# The insert's columns, in the order as_row builds its tuples.
COLUMNS = tuple(c.name for c in audit_events.columns if c.name != "id")


def _create_audit_events(conn: sa.Connection) -> None:
    # The table as first defined (0005 dropped two of its indexes), so a new database
    # replays every step in order.
    frozen = audit_events.to_metadata(sa.MetaData())
    sa.Index("ix_audit_events_event_type", frozen.c.event_type)
    sa.Index("ix_audit_events_dst_ip", frozen.c.dst_ip)
    frozen.create(conn)


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


def views_0003(dialect: str) -> list[str]:
    """The views as 0003 created them: each a scan of audit_events (0005 replaced them; the
    tests keep these as the plain recomputation the rollup-backed views must agree with)."""
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


def _create_views_0003(conn: sa.Connection) -> None:
    for statement in views_0003(conn.dialect.name):
        conn.exec_driver_sql(statement)


_BLOCK_TYPES = "('connection_blocked', 'protocol_blocked')"
_ACTIVITY_TYPES = ("('connection_allowed', 'connection_late_allowed', 'connection_blocked', "
                   "'protocol_blocked')")


def _total(column: str, when: str = "") -> str:
    value = f"CASE WHEN {when} THEN {column} ELSE 0 END" if when else column
    return f"CAST(SUM({value}) AS BIGINT)"


def _timeline(name: str, source: str, bucket: str) -> str:
    return f"""CREATE VIEW {name} AS
        SELECT host, {bucket}, events, connection_allowed + connection_late_allowed AS allowed,
               connection_blocked - superseded + protocol_blocked AS blocked, superseded,
               connection_late_allowed AS late_allowed, dns_blocked
        FROM {source}"""


def _view_statements(dialect: str) -> list[str]:
    """The views since 0005: the per-row ones join late_keys, the summaries read rollups."""
    processes = _process_list(dialect, "process")
    return [
        # `b.*` is expanded when the view is created: a migration that adds a column to
        # audit_events recreates these views.
        """CREATE VIEW audit_events_classified AS
        SELECT b.*,
               CASE WHEN b.dst_hostname <> '' THEN b.dst_hostname ELSE b.dst_ip END
                   AS destination,
               CASE WHEN b.event_type = 'connection_blocked' AND l.last_late >= b.timestamp
                   THEN 1 ELSE 0 END AS superseded
        FROM audit_events AS b
        LEFT JOIN late_keys AS l
          ON l.host = b.host AND l.dst_ip = b.dst_ip AND l.dst_port = b.dst_port
             AND l.protocol = b.protocol""",
        """CREATE VIEW audit_events_counted AS
        SELECT c.*,
               CASE WHEN c.event_type = 'protocol_blocked' OR (
                   c.event_type = 'connection_blocked' AND c.superseded = 0)
                   THEN 1 ELSE 0 END AS counted_block
        FROM audit_events_classified AS c""",
        f"""CREATE VIEW blocked_destinations AS
        SELECT host, destination, port, protocol, {_total("counted")} AS attempts,
               MIN(counted_first) AS first_seen, MAX(counted_last) AS last_seen,
               {processes} AS processes
        FROM (SELECT host, destination, dst_port AS port, protocol, counted, counted_first,
                     counted_last, process
              FROM destinations WHERE event_type IN {_BLOCK_TYPES} AND counted > 0
              ORDER BY host, destination, dst_port, protocol, process) AS b
        GROUP BY host, destination, port, protocol""",
        f"""CREATE VIEW process_activity AS
        SELECT host, process, {_total("events")} AS events,
               {_total("events", "event_type IN ('connection_allowed', "
                                 "'connection_late_allowed')")} AS allowed,
               {_total("counted", f"event_type IN {_BLOCK_TYPES}")} AS blocked,
               {_total("events", "event_type = 'connection_late_allowed'")} AS late_allowed,
               COUNT(DISTINCT destination) AS destinations,
               MIN(first_seen) AS first_seen, MAX(last_seen) AS last_seen
        FROM destinations WHERE event_type IN {_ACTIVITY_TYPES}
        GROUP BY host, process""",
        f"""CREATE VIEW dns_blocked_names AS
        SELECT host, destination AS name, {_total("events")} AS attempts,
               MIN(first_seen) AS first_seen, MAX(last_seen) AS last_seen
        FROM destinations WHERE event_type = 'dns_blocked'
        GROUP BY host, destination""",
        f"""CREATE VIEW late_allowed AS
        SELECT host, destination, dst_ip, port, protocol, matched_rule,
               {_total("events")} AS late_allows, MIN(first_seen) AS first_seen,
               MAX(last_seen) AS last_seen, {processes} AS processes
        FROM (SELECT host, destination, dst_ip, dst_port AS port, protocol, matched_rule,
                     events, first_seen, last_seen, process
              FROM destinations WHERE event_type = 'connection_late_allowed'
              ORDER BY host, destination, dst_ip, dst_port, protocol, matched_rule,
                       process) AS l
        GROUP BY host, destination, dst_ip, port, protocol, matched_rule""",
        _timeline("timeline", "activity_minutes", "minute"),
        _timeline("timeline_daily", "activity_days", "day"),
    ]


def _fill_statements() -> list[str]:
    """Build the rollups from the rows (0005: existing stores), through audit_events_classified."""
    types = ", ".join(f"SUM(CASE WHEN event_type = '{t}' THEN 1 ELSE 0 END)"
                      if t != "superseded" else "SUM(superseded)"
                      for t in TIMELINE_COUNTS[1:])
    counts = ", ".join(TIMELINE_COUNTS)
    return [
        """INSERT INTO late_keys (host, dst_ip, dst_port, protocol, last_late)
        SELECT host, dst_ip, dst_port, protocol, MAX(timestamp) FROM audit_events
        WHERE event_type = 'connection_late_allowed'
        GROUP BY host, dst_ip, dst_port, protocol""",
        f"""INSERT INTO activity_minutes (host, minute, {counts})
        SELECT host, substr(timestamp, 1, 16) || 'Z', COUNT(*), {types}
        FROM audit_events_classified GROUP BY host, substr(timestamp, 1, 16)""",
        f"""INSERT INTO activity_days (host, day, {counts})
        SELECT host, substr(timestamp, 1, 10), COUNT(*), {types}
        FROM audit_events_classified GROUP BY host, substr(timestamp, 1, 10)""",
        *(f"""INSERT INTO {table} ({", ".join(key)}, events, first_seen, last_seen, counted,
                                      counted_first, counted_last)
        SELECT {", ".join(key)}, COUNT(*), MIN(timestamp), MAX(timestamp), SUM(1 - superseded),
               MIN(CASE WHEN superseded = 0 THEN timestamp END),
               MAX(CASE WHEN superseded = 0 THEN timestamp END)
        FROM (SELECT substr(timestamp, 1, 10) AS day, c.* FROM audit_events_classified AS c) AS r
        GROUP BY {", ".join(key)}""" for table, key in (("destination_days", GROUP_KEY),
                                                        ("destinations", _TOTAL_KEY))),
    ]


def _rollups_0005(conn: sa.Connection) -> None:
    """Rollup tables built from the rows; the views read them; fewer indexes per row."""
    for view in reversed(VIEWS_0003):  # dependents first
        conn.exec_driver_sql(f"DROP VIEW {view}")
    for index in ("ix_audit_events_event_type", "ix_audit_events_dst_ip",
                  "ix_audit_events_host_timestamp", "ix_audit_events_late_allowed"):
        conn.exec_driver_sql(f"DROP INDEX {index}")
    # Finds the stored blocks a new late-allow supersedes (and only those rows: blocks are
    # the one kind whose counting changes after they are stored).
    conn.exec_driver_sql("CREATE INDEX ix_audit_events_blocks ON audit_events "
                         "(host, dst_ip, dst_port, protocol, timestamp) "
                         "WHERE event_type = 'connection_blocked'")
    for table in ROLLUPS:
        table.create(conn)
    statements = _view_statements(conn.dialect.name)
    conn.exec_driver_sql(statements[0])  # audit_events_classified, which the fill reads
    for statement in _fill_statements():
        conn.exec_driver_sql(statement)
    for statement in statements[1:]:
        conn.exec_driver_sql(statement)


VIEWS_0003 = ("audit_events_classified", "audit_events_counted", "blocked_destinations",
              "process_activity", "dns_blocked_names", "late_allowed", "timeline")
VIEWS = (*VIEWS_0003, "timeline_daily")
ROLLUP_VIEWS = VIEWS[2:]  # the views that read rollups, not rows

Migration = tuple[str, Callable[[sa.Connection], None]]
MIGRATIONS: tuple[Migration, ...] = (
    ("0001_audit_events", _create_audit_events),
    ("0002_fleet_indexes", _create_fleet_indexes),
    ("0003_views", _create_views_0003),
    ("0004_notified_destinations", lambda conn: notified_destinations.create(conn)),
    ("0005_rollups", _rollups_0005),
)

_encode_json = msgspec.json.encode
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

def _chain_text(chain: list[str]) -> str:
    try:
        return _encode_json(chain).decode()
    except UnicodeEncodeError:  # a lone surrogate: the json module writes it escaped
        return json.dumps(chain, ensure_ascii=False, separators=(",", ":"))


def as_row(e: AuditEvent) -> tuple:
    """The audit_events values of one record, in COLUMNS order."""
    # Values are already what every driver takes (str, int, bool): passing them through
    # Connection.execute's per-value bind processing halves the insert rate.
    return (e.event_id, e.host, sql_timestamp(e.timestamp), e.event_type, e.src_ip, e.dst_ip,
            e.dst_hostname, e.dst_port, e.protocol, e.process, e.pid, e.matched_rule,
            e.auto_allowed_type, _chain_text(e.cname_chain) if e.cname_chain else "",
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


# ---------------------------------------------------------------- rollup maintenance

_ROW_FIELDS = itemgetter(*(COLUMNS.index(f) for f in Row._fields))
_LATE_CHUNK = 200  # keys per lookup: four parameters each
_FLIPPED_SQL = (f"SELECT event_id, {', '.join(Row._fields)} FROM audit_events "
                "WHERE event_type = 'connection_blocked' AND host = ? AND dst_ip = ? "
                "AND dst_port = ? AND protocol = ? AND timestamp > ? AND timestamp <= ?")
# The counted rows of one destination group (those after its key's latest late-allow), on
# one day (between two bounds) or on all.
_COUNTED_SQL = ("SELECT MIN(timestamp), MAX(timestamp) FROM audit_events "
                "WHERE event_type = 'connection_blocked' AND host = ? AND dst_ip = ? "
                "AND dst_port = ? AND protocol = ? AND timestamp > ? AND timestamp >= ? "
                "AND timestamp < ? AND process = ? AND matched_rule = ? "
                "AND CASE WHEN dst_hostname <> '' THEN dst_hostname ELSE dst_ip END = ?")


def _set_counted_sql(table: str, keys: Sequence[str]) -> str:
    where = " AND ".join(f"{c} = ?" for c in keys)
    return f"UPDATE {table} SET counted_first = ?, counted_last = ? WHERE {where}"


def _upsert_sql(table: str, keys: Sequence[str], sums: Sequence[str],
                firsts: Sequence[str] = (), lasts: Sequence[str] = ()) -> str:
    """Add to a rollup row, creating it when new; NULL times never replace a value."""
    columns = (*keys, *sums, *firsts, *lasts)
    sets = [f"{c} = {table}.{c} + excluded.{c}" for c in sums]
    for names, op in ((firsts, "<"), (lasts, ">")):
        sets += [f"{c} = CASE WHEN {table}.{c} IS NULL OR excluded.{c} {op} {table}.{c} "
                 f"THEN excluded.{c} ELSE {table}.{c} END" for c in names]
    return (f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(sets)}")


_UPSERTS = {
    "late": _upsert_sql("late_keys", ("host", "dst_ip", "dst_port", "protocol"), (), (),
                        ("last_late",)),
    "minutes": _upsert_sql("activity_minutes", ("host", "minute"), TIMELINE_COUNTS),
    "days": _upsert_sql("activity_days", ("host", "day"), TIMELINE_COUNTS),
    "groups": _upsert_sql("destination_days", GROUP_KEY, ("events", "counted"),
                          ("first_seen", "counted_first"), ("last_seen", "counted_last")),
    "totals": _upsert_sql("destinations", _TOTAL_KEY, ("events", "counted"),
                          ("first_seen", "counted_first"), ("last_seen", "counted_last")),
}


class _Rollups:
    """Keeps the rollup tables in step with the rows a transaction inserts."""

    def __init__(self, dialect: str) -> None:
        self.postgresql = dialect == "postgresql"
        # One text per statement, in the driver's placeholder style.
        self.sql = {name: self._driver(text) for name, text in
                    {**_UPSERTS, "flipped": _FLIPPED_SQL, "counted": _COUNTED_SQL,
                     "set_groups": _set_counted_sql("destination_days", GROUP_KEY),
                     "set_totals": _set_counted_sql("destinations", _TOTAL_KEY)}.items()}

    def _driver(self, text: str) -> str:
        return text.replace("?", "%s") if self.postgresql else text

    def apply(self, conn: sa.Connection, rows: Sequence[tuple]) -> None:
        """Add rows (audit_events tuples just inserted, none of them stored before)."""
        new = list(map(_ROW_FIELDS, rows))
        if self.postgresql:
            # Writers of the same host (persist and an import) take turns: each must see the
            # other's late-allows and blocks. SQLite's BEGIN IMMEDIATE already serializes.
            for host in sorted({r[0] for r in new}):
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(1936484707, hashtext(%s))",
                                     (host,))
        batch_late = latest_late_allows(new)
        keys = block_keys(new) | batch_late.keys()
        stored = self._late_of(conn, keys) if keys else {}
        late = {**stored}
        moved = {k: ts for k, ts in batch_late.items() if ts > stored.get(k, "")}
        late.update(moved)
        deltas = aggregate(new, late)
        if moved:
            fresh = {r[0] for r in rows}
            flip(deltas, self._flipped(conn, moved, stored, fresh))
        self._write(conn, deltas, moved)
        if deltas.refresh:
            self._recount(conn, deltas.refresh, late)

    def _late_of(self, conn: sa.Connection, keys: set[tuple]) -> dict[tuple, str]:
        found: dict[tuple, str] = {}
        ordered = sorted(keys)
        for start in range(0, len(ordered), _LATE_CHUNK):
            chunk = ordered[start:start + _LATE_CHUNK]
            values = ", ".join([self._driver("(?, ?, ?, ?)")] * len(chunk))
            sql = ("SELECT host, dst_ip, dst_port, protocol, last_late FROM late_keys "
                   f"WHERE (host, dst_ip, dst_port, protocol) IN (VALUES {values})")
            params = tuple(v for key in chunk for v in key)
            for host, ip, port, protocol, last in conn.exec_driver_sql(sql, params):
                found[(host, ip, port, protocol)] = last
        return found

    def _flipped(self, conn: sa.Connection, moved: dict[tuple, str], stored: dict[tuple, str],
                 fresh: set[str]) -> list[Flip]:
        """Stored blocks that the batch's late-allows supersede (they were counted)."""
        flipped = []
        for key, last in sorted(moved.items()):
            for event_id, *fields in conn.exec_driver_sql(
                    self.sql["flipped"], (*key, stored.get(key, ""), last)):
                if event_id not in fresh:  # the batch's own blocks are classified already
                    flipped.append(Flip(*fields))
        return flipped

    def _write(self, conn: sa.Connection, deltas: Deltas, moved: dict[tuple, str]) -> None:
        # Concurrent writers on PostgreSQL lock rows in one order (no deadlock); SQLite has
        # one writer at a time and is spared the sort.
        order = sorted if self.postgresql else list
        batches = {
            "late": [(*k, ts) for k, ts in order(moved.items())],
            "minutes": [(*k, *v) for k, v in order(deltas.minutes.items())],
            "days": [(*k, *v) for k, v in order(deltas.days.items())],
            "groups": [(*k, v[0], v[3], v[1], v[4], v[2], v[5])
                       for k, v in order(deltas.groups.items())],
            "totals": [(*k, v[0], v[3], v[1], v[4], v[2], v[5])
                       for k, v in order(deltas.totals.items())],
        }
        for name, params in batches.items():
            if params:
                conn.exec_driver_sql(self.sql[name], params)

    def _recount(self, conn: sa.Connection, groups: set[tuple], late: dict[tuple, str]) -> None:
        """First and last counted time of groups whose earlier counted rows were superseded."""
        days, totals = [], {}
        for key in sorted(groups):
            host, day, destination, port, protocol, process, _, ip, rule = key
            after = late[(host, ip, port, protocol)]
            # A day's rows lie between "YYYY-MM-DD" and "YYYY-MM-DDU" ("T" < "U").
            first, last = conn.exec_driver_sql(self.sql["counted"], (
                host, ip, port, protocol, after, day, day + "U", process, rule,
                destination)).one()
            days.append((first, last, *key))
            totals[total_key(key)] = (host, ip, port, protocol, after, "", "~", process, rule,
                                      destination)
        conn.exec_driver_sql(self.sql["set_groups"], days)
        conn.exec_driver_sql(self.sql["set_totals"], [
            (*conn.exec_driver_sql(self.sql["counted"], bounds).one(), *key)
            for key, bounds in sorted(totals.items())])


# Retention: each batch is one short transaction, so a writer waits for at most one.
PRUNE_BATCH = 5_000


class Pruned(NamedTuple):
    rows: int     # audit_events rows deleted
    minutes: int  # activity_minutes rows deleted (the timeline's buckets before the cutoff)
    done: bool    # no older row is left

_PRUNE_ROWS = sa.text("DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events "
                      "WHERE timestamp < :before ORDER BY timestamp LIMIT :limit)")
_PRUNE_MINUTES = sa.text("DELETE FROM activity_minutes WHERE minute < :minute")


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
        self._rollups = _Rollups(dialect.name)

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
                    rows = list(map(as_row, events))
                    if self._execute(conn, rows) == len(events):
                        self._rollups.apply(conn, rows)
                        return list(events)
                    tx.rollback()
                # Some ids are stored already (a batch written again): insert only the
                # others, so the caller learns exactly which records are new rows and the
                # rollups count each row once.
                with conn.begin():
                    fresh = self._unstored(conn, events)
                    rows = list(map(as_row, fresh))
                    self._execute(conn, rows)
                    self._rollups.apply(conn, rows)
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

    def prune_batch(self, before: str, limit: int = PRUNE_BATCH) -> Pruned:
        """Delete up to limit audit rows older than before (fixed-width text) in one short
        transaction; with the last of them, also the timeline minutes before it.

        The daily and all-time rollups, and late_keys, are kept: they go on counting the
        pruned past.
        """
        try:
            with self.engine.begin() as conn:
                rows = conn.execute(_PRUNE_ROWS, {"before": before, "limit": limit}).rowcount
                if rows == limit:
                    return Pruned(rows, 0, False)
                minutes = conn.execute(_PRUNE_MINUTES, {"minute": before[:16] + "Z"}).rowcount
                return Pruned(rows, minutes, True)
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: pruning failed: {_one_line(err)}") from None

    def prune(self, before: str, limit: int = PRUNE_BATCH) -> Pruned:
        """Every audit row older than before, in batches of limit; what was deleted."""
        rows = 0
        while True:
            batch = self.prune_batch(before, limit)
            rows += batch.rows
            if batch.done:
                return batch._replace(rows=rows)

    def close(self) -> None:
        self.engine.dispose()
