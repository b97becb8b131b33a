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

The summaries read rollup tables (rollups.py). On SQLite a writer may store rows apart from
them and add them later (defer_rollups, catch_up: persist during a burst); the views add the
rows not counted yet (`audit_events_unrolled`), so they answer for every row at every moment.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import msgspec
import sqlalchemy as sa
from sqlalchemy import event as sa_event

if TYPE_CHECKING:
    import sqlite3

    from sqlalchemy.dialects import postgresql, sqlite
    DialectInsert = sqlite.Insert | postgresql.Insert

from .. import private
from .records import AuditEvent, collector_paused, parse_timestamp, sql_timestamp
from .sqlite_memory import skip_memory_statistics
from ..errors import StoreError
from ..events import DeliveredDestination
from ..fingerprints import FingerprintSet
from .rollups import (GROUP_VALUES, LATE_ALLOWED, MINUTE_KEY, TIMELINE_COUNTS, TOTAL_KEY,
                      Deltas, Flipped, Row, aggregate, flip, gather)

metadata = sa.MetaData()

def _first_audit_events(meta: sa.MetaData) -> sa.Table:
    """audit_events with the columns 0001 created and the indexes it keeps now; later
    migrations add their own columns (0008: cgroup, container)."""
    return sa.Table(
        "audit_events", meta,
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
        # Time windows and retention. The summary views read the rollups, so since 0005 this and
        # the event_id key are all a row must update.
        sa.Index("ix_audit_events_timestamp", "timestamp"),
    )


audit_events = _first_audit_events(metadata)
CGROUP_COLUMNS = ("cgroup", "container")  # 0008: the owner's cgroup v2 path, its container
for _name in CGROUP_COLUMNS:
    audit_events.append_column(sa.Column(_name, sa.Text, nullable=False, server_default=""))

schema_migrations = sa.Table(
    "schema_migrations", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("applied_at", sa.Text, nullable=False),
)

# notify's memory of the destinations it has alerted on, per host (a fleet shares one
# store); persist writes it for notify (one writer per store), notify reads it at start.
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

# The export stage's cursors: per host and sink ("otlp", "syslog"), the highest audit_events
# id that sink has delivered; the export stage is the only writer of this table.
export_cursors = sa.Table(
    "export_cursors", metadata,
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("sink", sa.Text, primary_key=True),
    sa.Column("last_id", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
)

# The rollups (pipeline/audit/rollups.py says what each holds); persist and `sluice import` keep
# them in step with audit_events in the same transaction. Counts are 64-bit; the views cast
# their sums back to BIGINT, which PostgreSQL would otherwise widen to numeric.
# sqlite_with_rowid=False: on SQLite, one B-tree per table, keyed like the primary key.


def _counts() -> list[sa.Column]:
    return [sa.Column(name, sa.BigInteger, nullable=False) for name in TIMELINE_COUNTS]


# SQLite: the last audit_events id whose row the rollups count (one row, 0009). A writer may
# leave later rows for catch_up (persist does, while records keep coming); the summary views
# add those rows themselves (audit_events_unrolled), so they answer for every row stored.
rollup_progress = sa.Table(
    "rollup_progress", metadata,
    sa.Column("last_id", sa.BigInteger, nullable=False),
)
late_keys = sa.Table(
    "late_keys", metadata,
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("dst_ip", sa.Text, primary_key=True),
    sa.Column("dst_port", sa.Integer, primary_key=True),
    sa.Column("protocol", sa.Text, primary_key=True),
    sa.Column("last_late", sa.Text, nullable=False),
    sqlite_with_rowid=False,
)
activity_minutes = sa.Table(
    "activity_minutes", metadata,
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("minute", sa.Text, primary_key=True),  # 2026-01-01T10:00Z
    *_counts(), sqlite_with_rowid=False,
)
activity_days = sa.Table(
    "activity_days", metadata,
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("day", sa.Text, primary_key=True),  # 2026-01-01
    *_counts(), sqlite_with_rowid=False,
)


def _groups(name: str, key: Sequence[str], meta: sa.MetaData = metadata) -> sa.Table:
    """A table of destination groups keyed by key (rollups.py: MINUTE_KEY, TOTAL_KEY)."""
    return sa.Table(
        name, meta,
        *(sa.Column(c, sa.Integer if c == "dst_port" else sa.Text, primary_key=True)
          for c in key),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("first_seen", sa.Text, nullable=False),
        sa.Column("last_seen", sa.Text, nullable=False),
        sa.Column("counted", sa.BigInteger, nullable=False),
        sa.Column("counted_first", sa.Text),  # NULL when every row of the group is superseded
        sa.Column("counted_last", sa.Text),
        sqlite_with_rowid=False,
    )


destination_minutes = _groups("destination_minutes", MINUTE_KEY)
# From a late-allow's key to the minute groups of blocks it may supersede.
sa.Index("ix_destination_minutes_key", *(destination_minutes.c[c] for c in
                                         ("host", "dst_ip", "dst_port", "protocol", "event_type")))
destinations = _groups("destinations", TOTAL_KEY)
# 0005 kept groups per day; 0006 replaced them with destination_minutes.
_DAY_KEY_0005 = ("host", "day", "destination", "dst_port", "protocol", "process", "event_type",
                 "dst_ip", "matched_rule")

# The insert's columns, in the order as_row builds its tuples.
COLUMNS = tuple(c.name for c in audit_events.columns if c.name != "id")


def _create_audit_events(conn: sa.Connection) -> None:
    # The table as first defined (0005 dropped two of its indexes, 0008 added columns), so
    # a new database replays every step in order.
    frozen = _first_audit_events(sa.MetaData())
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


# A destination group's values, in the tables' column order, from its classified rows: the
# fills of 0005 and 0006, and the rows the rollups do not count yet.
_GROUP_AGGREGATES = """COUNT(*) AS events, MIN(timestamp) AS first_seen,
               MAX(timestamp) AS last_seen, SUM(1 - superseded) AS counted,
               MIN(CASE WHEN superseded = 0 THEN timestamp END) AS counted_first,
               MAX(CASE WHEN superseded = 0 THEN timestamp END) AS counted_last"""


def _activity_counts() -> str:
    """The activity tables' counts (TIMELINE_COUNTS) from classified rows, each named."""
    return ", ".join(("COUNT(*)" if name == "events" else "SUM(superseded)"
                      if name == "superseded" else
                      f"SUM(CASE WHEN event_type = '{name}' THEN 1 ELSE 0 END)")
                     + f" AS {name}" for name in TIMELINE_COUNTS)


def _unrolled_groups() -> str:
    """destinations' columns for the rows not yet in the rollups (SQLite), grouped alike."""
    key = ", ".join(TOTAL_KEY)
    return f"SELECT {key}, {_GROUP_AGGREGATES} FROM audit_events_unrolled GROUP BY {key}"


def _unrolled_activity(width: int) -> str:
    """activity_minutes' (16: minute) or activity_days' (10: day) counts for the rows not yet
    in the rollups."""
    bucket = "substr(timestamp, 1, 16) || 'Z'" if width == 16 else "substr(timestamp, 1, 10)"
    return (f"SELECT host, {bucket} AS bucket, {_activity_counts()} "
            f"FROM audit_events_unrolled GROUP BY host, {bucket}")


def _all_groups(tail: bool) -> str:
    """What the all-time views read: destinations, and with tail the rows it lacks yet."""
    if not tail:
        return "destinations"
    columns = ", ".join((*TOTAL_KEY, "events", "first_seen", "last_seen", "counted",
                         "counted_first", "counted_last"))
    return (f"(SELECT {columns} FROM destinations UNION ALL {_unrolled_groups()}) "
            "AS destinations")


def _all_activity(table: str, bucket: str, tail: bool) -> str:
    """What the timelines read: a rollup, and with tail the counts of the rows it lacks yet
    (added to its bucket, or a bucket of their own). No GROUP BY over the rollup, so a
    window's host and time still reach its key."""
    if not tail:
        return table
    unrolled = _unrolled_activity(16 if bucket == "minute" else 10)
    added = ", ".join(f"a.{name} + COALESCE(t.{name}, 0) AS {name}"
                      for name in TIMELINE_COUNTS)
    return f"""(SELECT a.host, a.{bucket}, {added}
        FROM {table} AS a LEFT JOIN ({unrolled}) AS t
          ON t.host = a.host AND t.bucket = a.{bucket}
        UNION ALL
        SELECT t.* FROM ({unrolled}) AS t
        WHERE NOT EXISTS (SELECT 1 FROM {table} AS a
                          WHERE a.host = t.host AND a.{bucket} = t.bucket)) AS {table}"""


def _view_statements(dialect: str, tail: bool = False) -> list[str]:
    """The views since 0005: the per-row ones join late_keys, the summaries read rollups.
    With tail (0009, SQLite) the summaries add the rows persist has not rolled up yet
    (audit_events_unrolled), so they answer for every row stored."""
    processes = _process_list(dialect, "process")
    groups = _all_groups(tail)
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
              FROM {groups} WHERE event_type IN {_BLOCK_TYPES} AND counted > 0
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
        FROM {groups} WHERE event_type IN {_ACTIVITY_TYPES}
        GROUP BY host, process""",
        f"""CREATE VIEW dns_blocked_names AS
        SELECT host, destination AS name, {_total("events")} AS attempts,
               MIN(first_seen) AS first_seen, MAX(last_seen) AS last_seen
        FROM {groups} WHERE event_type = 'dns_blocked'
        GROUP BY host, destination""",
        f"""CREATE VIEW late_allowed AS
        SELECT host, destination, dst_ip, port, protocol, matched_rule,
               {_total("events")} AS late_allows, MIN(first_seen) AS first_seen,
               MAX(last_seen) AS last_seen, {processes} AS processes
        FROM (SELECT host, destination, dst_ip, dst_port AS port, protocol, matched_rule,
                     events, first_seen, last_seen, process
              FROM {groups} WHERE event_type = 'connection_late_allowed'
              ORDER BY host, destination, dst_ip, dst_port, protocol, matched_rule,
                       process) AS l
        GROUP BY host, destination, dst_ip, port, protocol, matched_rule""",
        _timeline("timeline", _all_activity("activity_minutes", "minute", tail), "minute"),
        _timeline("timeline_daily", _all_activity("activity_days", "day", tail), "day"),
    ]


def _fill_groups(table: str, key: Sequence[str]) -> str:
    """Fill a table of destination groups from the rows, through audit_events_classified."""
    return f"""INSERT INTO {table} ({", ".join(key)}, events, first_seen, last_seen, counted,
                                    counted_first, counted_last)
        SELECT {", ".join(key)}, {_GROUP_AGGREGATES}
        FROM (SELECT substr(timestamp, 1, 10) AS day, substr(timestamp, 1, 16) || 'Z' AS minute,
                     c.* FROM audit_events_classified AS c) AS r
        GROUP BY {", ".join(key)}"""


def _fill_statements_0005() -> list[str]:
    types = _activity_counts()
    counts = ", ".join(TIMELINE_COUNTS)
    return [
        """INSERT INTO late_keys (host, dst_ip, dst_port, protocol, last_late)
        SELECT host, dst_ip, dst_port, protocol, MAX(timestamp) FROM audit_events
        WHERE event_type = 'connection_late_allowed'
        GROUP BY host, dst_ip, dst_port, protocol""",
        f"""INSERT INTO activity_minutes (host, minute, {counts})
        SELECT host, substr(timestamp, 1, 16) || 'Z', {types}
        FROM audit_events_classified GROUP BY host, substr(timestamp, 1, 16)""",
        f"""INSERT INTO activity_days (host, day, {counts})
        SELECT host, substr(timestamp, 1, 10), {types}
        FROM audit_events_classified GROUP BY host, substr(timestamp, 1, 10)""",
        _fill_groups("destination_days", _DAY_KEY_0005),
        _fill_groups("destinations", TOTAL_KEY),
    ]


def _rollups_0005(conn: sa.Connection) -> None:
    """Rollup tables built from the rows; the views read them; fewer indexes per row."""
    for view in reversed(VIEWS_0003):  # dependents first
        conn.exec_driver_sql(f"DROP VIEW {view}")
    for index in ("ix_audit_events_event_type", "ix_audit_events_dst_ip",
                  "ix_audit_events_host_timestamp", "ix_audit_events_late_allowed"):
        conn.exec_driver_sql(f"DROP INDEX {index}")
    conn.exec_driver_sql("CREATE INDEX ix_audit_events_blocks ON audit_events "
                         "(host, dst_ip, dst_port, protocol, timestamp) "
                         "WHERE event_type = 'connection_blocked'")
    for table in (late_keys, activity_minutes, activity_days, destinations):
        table.create(conn)
    _groups("destination_days", _DAY_KEY_0005, sa.MetaData()).create(conn)
    statements = _view_statements(conn.dialect.name)
    conn.exec_driver_sql(statements[0])  # audit_events_classified, which the fill reads
    for statement in _fill_statements_0005():
        conn.exec_driver_sql(statement)
    for statement in statements[1:]:
        conn.exec_driver_sql(statement)


def _minute_groups_0006(conn: sa.Connection) -> None:
    """Per-minute destination groups find the blocks a late-allow supersedes: cheaper for the
    writer than the index on blocked rows (one entry per destination and minute, not one per
    row), and a grain fine enough for time windows (a window is a range of their key)."""
    conn.exec_driver_sql("DROP INDEX ix_audit_events_blocks")
    conn.exec_driver_sql("DROP TABLE destination_days")
    destination_minutes.create(conn)
    conn.exec_driver_sql(_fill_groups("destination_minutes", MINUTE_KEY))


def _cgroup_columns_0008(conn: sa.Connection) -> None:
    """The owner's cgroup and container on every row ("" for rows stored before)."""
    for name in CGROUP_COLUMNS:
        conn.exec_driver_sql(f"ALTER TABLE audit_events ADD COLUMN {name} TEXT NOT NULL "
                             "DEFAULT ''")
    # PostgreSQL expanded `b.*` when the per-row views were made: make them again.
    conn.exec_driver_sql("DROP VIEW audit_events_counted")
    conn.exec_driver_sql("DROP VIEW audit_events_classified")
    for statement in _view_statements(conn.dialect.name)[:2]:
        conn.exec_driver_sql(statement)


def _unrolled_view(dialect: str) -> str:
    """The rows not in the rollups yet: on SQLite those after rollup_progress; PostgreSQL's
    writers add every row to the rollups in its own transaction, so none wait there."""
    after = ("c.id > (SELECT last_id FROM rollup_progress)" if dialect == "sqlite"
             else "false")
    return f"""CREATE VIEW audit_events_unrolled AS
        SELECT c.* FROM audit_events_classified AS c WHERE {after}"""


def _minute_groups_view() -> str:
    """destination_minutes and, a group of one each, the rows not in it yet: what a time
    window reads (a range of minutes, which reaches both parts)."""
    columns = ", ".join((*MINUTE_KEY, *GROUP_VALUES))
    counted = "CASE WHEN superseded = 0 THEN timestamp END"
    return f"""CREATE VIEW destination_minutes_all AS
        SELECT {columns} FROM destination_minutes
        UNION ALL
        SELECT {", ".join(MINUTE_KEY).replace("minute", "substr(timestamp, 1, 16) || 'Z'", 1)},
               1, 1 - superseded, timestamp, {counted}, timestamp, {counted}
        FROM audit_events_unrolled"""


def _rollup_lag_0009(conn: sa.Connection) -> None:
    """On SQLite a writer may leave the rollups behind the rows (AuditStore's catch_up adds
    them later), and the summary views add what they lack from the rows after the mark."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        rollup_progress.create(conn)
        conn.exec_driver_sql("INSERT INTO rollup_progress (last_id) "
                             "SELECT COALESCE(MAX(id), 0) FROM audit_events")
    for view in reversed(ROLLUP_VIEWS):  # none depends on another
        conn.exec_driver_sql(f"DROP VIEW {view}")
    conn.exec_driver_sql(_unrolled_view(dialect))
    conn.exec_driver_sql(_minute_groups_view())
    for statement in _view_statements(dialect, tail=True)[2:]:
        conn.exec_driver_sql(statement)


VIEWS_0003 = ("audit_events_classified", "audit_events_counted", "blocked_destinations",
              "process_activity", "dns_blocked_names", "late_allowed", "timeline")
# The views that read rollups (and, since 0009, the rows not rolled up yet), not every row.
ROLLUP_VIEWS = (*VIEWS_0003[2:], "timeline_daily")
# The rows the rollups do not count yet, as rows and as minute groups (0009).
VIEWS_0009 = ("audit_events_unrolled", "destination_minutes_all")
VIEWS = (*VIEWS_0003, "timeline_daily", *VIEWS_0009)

Migration = tuple[str, Callable[[sa.Connection], None]]
MIGRATIONS: tuple[Migration, ...] = (
    ("0001_audit_events", _create_audit_events),
    ("0002_fleet_indexes", _create_fleet_indexes),
    ("0003_views", _create_views_0003),
    ("0004_notified_destinations", lambda conn: notified_destinations.create(conn)),
    ("0005_rollups", _rollups_0005),
    ("0006_minute_groups", _minute_groups_0006),
    ("0007_export_cursors", lambda conn: export_cursors.create(conn)),
    ("0008_cgroup_container", _cgroup_columns_0008),
    ("0009_rollup_lag", _rollup_lag_0009),
)

_encode_json = msgspec.json.encode
BUSY_TIMEOUT_MS = 1000  # short: a stopping persist must finish within honcho's 5 seconds
BACKENDS = ("sqlite", "postgresql")
_ID_CHUNK = 500  # ids per IN (...) when looking for already stored records


class StoreRejected(StoreError):
    """The database refuses the data itself: retrying the same rows cannot help."""


def dialect_insert(backend: str, table: sa.Table) -> DialectInsert:
    """The backend's own INSERT, the one that can say ON CONFLICT (the generic one cannot).
    Imported for the backend in use only: PostgreSQL's dialect brings asyncio and more."""
    module = importlib.import_module(f"sqlalchemy.dialects.{backend}")
    return module.insert(table)


def _one_line(err: BaseException) -> str:
    inner = getattr(err, "orig", None) or err  # the driver's message, without SQL and links
    return " ".join(str(inner).split()) or type(inner).__name__


# ---------------------------------------------------------------- engines

def sqlite_file(url_text: str) -> Path | None:
    """The database file of a SQLite URL text, or None (another database, memory, URI)."""
    try:
        url = sa.make_url(url_text)
    except sa.exc.ArgumentError:
        return None
    return _sqlite_file(url) if url.get_backend_name() == "sqlite" else None


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


def _engine(url_text: str, *, readonly: bool, busy_timeout_ms: int,
            wal_limit_bytes: int | None = None,
            gid: int | None = None) -> tuple[sa.Engine, str]:
    """Create an engine and connect once, so every open problem surfaces here as StoreError.
    wal_limit_bytes: a SQLite writer whose WAL another connection checkpoints (_Checkpointer);
    None: SQLite checkpoints in the writer's commits."""
    try:
        url = sa.make_url(url_text)
    except sa.exc.ArgumentError:
        raise StoreError(f"not a database URL: {url_text!r}") from None
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    if backend not in BACKENDS:
        raise StoreError(f"{shown}: unsupported database {backend!r} (use sqlite or postgresql)")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # SQLAlchemy would pick psycopg2
    path = _sqlite_file(url) if backend == "sqlite" else None
    if path is not None:
        url = _prepare_sqlite_path(url, path, readonly, shown, gid)
    if backend == "sqlite":
        skip_memory_statistics()  # before the driver loads: it starts SQLite
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
            # A 16 MiB page cache keeps the indexes' hot pages in memory under a flood: 32
            # stored no faster in the flood or benchmarks/persist_throughput.py, 8 stored
            # about 15% slower (every stage shares the host's memory budget: the flood
            # benchmark prints the total).
            # 16 KiB pages (for a new file; an existing one keeps its own): fewer, fuller
            # B-tree pages to update per batch (benchmarks/persist_throughput.py).
            pragmas += ["PRAGMA page_size=16384", "PRAGMA journal_mode=WAL",
                        "PRAGMA synchronous=NORMAL", "PRAGMA cache_size=-16384"]
            if wal_limit_bytes is not None:
                # The file left after a WAL restart shrinks back to the limit, so its size
                # says how far the WAL has grown since (_Checkpointer.committed).
                pragmas += ["PRAGMA wal_autocheckpoint=0",
                            f"PRAGMA journal_size_limit={int(wal_limit_bytes)}"]
        _sqlite_events(engine, begin="BEGIN" if readonly else "BEGIN IMMEDIATE", pragmas=pragmas)
    elif readonly:
        _postgresql_read_only_sessions(engine)
        engine = engine.execution_options(postgresql_readonly=True)
    _check(engine, backend, path, readonly, shown)
    return engine, shown


def _prepare_sqlite_path(url: sa.URL, path: Path, readonly: bool, shown: str,
                         gid: int | None) -> sa.URL:
    if readonly:
        # mode=ro: the driver itself refuses writes, and a missing file is an error.
        uri = "file:" + urllib.parse.quote(os.path.abspath(path))
        return url.set(database=uri, query={"mode": "ro", "uri": "true"})
    try:
        # A new store is private (SQLite gives its -wal and -shm files the same mode).
        private.create_file(path, gid)
    except OSError as err:
        raise StoreError(f"{shown}: cannot create {path}: {err.strerror or err}") from None
    return url


def _check(engine: sa.Engine, backend: str, path: Path | None, readonly: bool,
           shown: str) -> None:
    import sqlite3  # not at the top: SQLite must not start before skip_memory_statistics

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
    # Values are already what every driver takes (str, int): passing them through
    # Connection.execute's per-value bind processing halves the insert rate. The three flags
    # go as 0 and 1, which both databases store in their boolean columns: sqlite3 binds a
    # bool only after looking for an adapter, which raises and drops an AttributeError per
    # value, about a sixth of the insert's time.
    return (e.event_id, e.host, sql_timestamp(e.timestamp), e.event_type, e.src_ip, e.dst_ip,
            e.dst_hostname, e.dst_port, e.protocol, e.process, e.pid, e.matched_rule,
            e.auto_allowed_type, _chain_text(e.cname_chain) if e.cname_chain else "",
            int(e.mid_stream), int(e.would_deny), int(e.blocked), e.packets, e.cgroup,
            e.container)


def from_row(row: Sequence) -> AuditEvent:
    """The record of an audit_events row in COLUMNS order (as_row's inverse)."""
    (event_id, host, timestamp, event_type, src_ip, dst_ip, dst_hostname, dst_port, protocol,
     process, pid, matched_rule, auto_allowed_type, cname_chain, mid_stream, would_deny,
     blocked, packets, cgroup, container) = row
    return AuditEvent(parse_timestamp(timestamp), event_type, src_ip, dst_ip, dst_hostname,
                      dst_port, protocol, process, pid, matched_rule, auto_allowed_type,
                      json.loads(cname_chain) if cname_chain else [], bool(mid_stream),
                      bool(would_deny), bool(blocked), packets, event_id, host,
                      cgroup=cgroup, container=container)


# PostgreSQL takes a batch fastest as COPY into a scratch table that every commit empties,
# then one INSERT ... SELECT that skips stored ids: about 1.8x the rows/s of executemany with
# 8,192-row batches (benchmarks/replay_throughput.py shows the end-to-end effect).
_QUOTED = ", ".join(f'"{c}"' for c in COLUMNS)
_SCRATCH_SQL = ("CREATE TEMP TABLE IF NOT EXISTS incoming_audit_events ON COMMIT DELETE ROWS "
                f"AS SELECT {_QUOTED} FROM audit_events WITH NO DATA")
_COPY_SQL = f"COPY incoming_audit_events ({_QUOTED}) FROM STDIN"
_MOVE_SQL = (f"INSERT INTO audit_events ({_QUOTED}) SELECT {_QUOTED} FROM incoming_audit_events "
             "ON CONFLICT (event_id) DO NOTHING")


def _copy(conn: sa.Connection, sql: str, rows: Sequence[tuple]) -> None:
    """COPY rows into a scratch table on PostgreSQL, in the connection's transaction."""
    import psycopg

    driver = conn.connection.dbapi_connection
    assert isinstance(driver, psycopg.Connection), "PostgreSQL is reached through psycopg 3"
    try:
        with driver.cursor() as cursor:
            with cursor.copy(sql) as copy:
                for row in rows:
                    copy.write_row(row)
    except psycopg.OperationalError as err:
        raise StoreError(f"PostgreSQL: {_one_line(err)}") from None
    except psycopg.Error as err:  # raw driver errors: SQLAlchemy does not wrap a COPY
        raise StoreRejected(f"PostgreSQL: {_one_line(err)}") from None


def _copy_insert(conn: sa.Connection, rows: list[tuple]) -> int:
    """Insert rows on PostgreSQL in the connection's transaction; returns the rows inserted."""
    conn.exec_driver_sql(_SCRATCH_SQL)
    _copy(conn, _COPY_SQL, rows)
    return conn.exec_driver_sql(_MOVE_SQL).rowcount


# ---------------------------------------------------------------- rollup maintenance

_ROW_FIELDS = itemgetter(*(COLUMNS.index(f) for f in Row._fields))
_LATE_CHUNK = 200  # keys per lookup: four parameters each
# From this many keys of one host, its late-allowed keys are read whole when there are at
# most _LATE_SCAN_MAX of them.
_LATE_SCAN_FROM, _LATE_SCAN_MAX = 256, 4096
_HOST_LATE_SQL = ("SELECT dst_ip, dst_port, protocol, last_late FROM late_keys WHERE host = ? "
                  "LIMIT ?")
_KEY_WHERE = "host = ? AND dst_ip = ? AND dst_port = ? AND protocol = ?"
# The minute groups of blocks with counted rows at or before a late-allow (a range of the
# table's key).
_COUNTED_GROUPS_SQL = ("SELECT minute, destination, process, matched_rule, counted_first, "
                       "counted_last, counted FROM destination_minutes{by_key} "
                       f"WHERE {_KEY_WHERE} AND event_type = 'connection_blocked' "
                       "AND counted > 0 AND counted_first <= ?")
# The rows of one minute group between two times (the timestamp index, within a minute).
_GROUP_ROWS_SQL = ("SELECT event_id, timestamp FROM audit_events "
                   "WHERE timestamp >= ? AND timestamp <= ? "
                   f"AND event_type = 'connection_blocked' AND {_KEY_WHERE} "
                   "AND process = ? AND matched_rule = ? "
                   "AND CASE WHEN dst_hostname <> '' THEN dst_hostname ELSE dst_ip END = ?")
_SET_GROUP_SQL = ("UPDATE destination_minutes SET counted = counted - ?, counted_first = ?, "
                  "counted_last = ? WHERE " + " AND ".join(f"{c} = ?" for c in MINUTE_KEY))
# An all-time group's counted span from its minute groups; with none left, a group that
# still counts pruned rows keeps the times it had.
_TOTAL_SPAN_SQL = ("SELECT MIN(counted_first), MAX(counted_last) FROM destination_minutes"
                   f"{{by_key}} WHERE {_KEY_WHERE} AND event_type = ? AND destination = ? "
                   "AND process = ? "
                   "AND matched_rule = ? AND counted > 0")
_SET_TOTAL_SQL = ("UPDATE destinations SET "
                  "counted_first = CASE WHEN counted > 0 THEN COALESCE(?, counted_first) END, "
                  "counted_last = CASE WHEN counted > 0 THEN COALESCE(?, counted_last) END "
                  "WHERE " + " AND ".join(f"{c} = ?" for c in TOTAL_KEY))


class _Upsert:
    """Adds rows to a table keyed by keys, creating them when new: sums are added, firsts
    and lasts keep the earliest and latest (NULL never replaces a value), kept columns keep
    what was stored first. With only kept columns, a stored row is left as it is.

    SQLite: one statement per row (executemany). PostgreSQL: the rows are copied into a
    scratch table that each commit empties, then added by one statement, in key order (two
    writers lock rows in the same order: no deadlock).
    """

    def __init__(self, table: str, keys: Sequence[str], sums: Sequence[str],
                 firsts: Sequence[str] = (), lasts: Sequence[str] = (),
                 kept: Sequence[str] = ()) -> None:
        names = ", ".join((*keys, *sums, *firsts, *lasts, *kept))
        sets = [f"{c} = {table}.{c} + excluded.{c}" for c in sums]
        for columns, op in ((firsts, "<"), (lasts, ">")):
            sets += [f"{c} = CASE WHEN {table}.{c} IS NULL OR excluded.{c} {op} {table}.{c} "
                     f"THEN excluded.{c} ELSE {table}.{c} END" for c in columns]
        action = f"DO UPDATE SET {', '.join(sets)}" if sets else "DO NOTHING"
        conflict = f"ON CONFLICT ({', '.join(keys)}) {action}"
        count = len(keys) + len(sums) + len(firsts) + len(lasts) + len(kept)
        self.row_sql = (f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * count)}) "
                        f"{conflict}")
        scratch = f"incoming_{table}"
        self.scratch_sql = (f"CREATE TEMP TABLE IF NOT EXISTS {scratch} ON COMMIT DELETE ROWS "
                            f"AS SELECT {names} FROM {table} WITH NO DATA")
        self.copy_sql = f"COPY {scratch} ({names}) FROM STDIN"
        self.merge_sql = (f"INSERT INTO {table} ({names}) SELECT {names} FROM {scratch} "
                          f"ORDER BY {', '.join(keys)} {conflict}")

    def write(self, conn: sa.Connection, rows: list[tuple], postgresql: bool) -> None:
        if not postgresql:
            conn.exec_driver_sql(self.row_sql, rows)
            return
        conn.exec_driver_sql(self.scratch_sql)
        _copy(conn, self.copy_sql, rows)
        conn.exec_driver_sql(self.merge_sql)


# Summed, then the earliest, then the latest: GROUP_VALUES is in this order.
_GROUP_SUMS = (GROUP_VALUES[:2], GROUP_VALUES[2:4], GROUP_VALUES[4:])
_UPSERTS = {
    "late": _Upsert("late_keys", ("host", "dst_ip", "dst_port", "protocol"), (), (),
                    ("last_late",)),
    "minutes": _Upsert("activity_minutes", ("host", "minute"), TIMELINE_COUNTS),
    "days": _Upsert("activity_days", ("host", "day"), TIMELINE_COUNTS),
    "groups": _Upsert("destination_minutes", MINUTE_KEY, *_GROUP_SUMS),
    "totals": _Upsert("destinations", TOTAL_KEY, *_GROUP_SUMS),
}
# notify's delivered destinations: the first delivery of a key is the one kept.
_REMEMBER = _Upsert("notified_destinations", ("host", "destination"), (),
                    kept=("hostname", "ip", "port", "protocol", "first_seen", "delivered_at"))


class _Rollups:
    """Keeps the rollup tables in step with the rows a transaction inserts."""

    def __init__(self, dialect: str) -> None:
        self.postgresql = dialect == "postgresql"
        # One text per statement, in the driver's placeholder style.
        self.sql = {name: self._driver(text) for name, text in
                    {"counted_groups": _COUNTED_GROUPS_SQL, "host_late": _HOST_LATE_SQL,
                     "group_rows": _GROUP_ROWS_SQL, "set_group": _SET_GROUP_SQL,
                     "total_span": _TOTAL_SPAN_SQL, "set_total": _SET_TOTAL_SQL}.items()}

    def _driver(self, text: str) -> str:
        if self.postgresql:
            return text.replace("?", "%s").replace("{by_key}", "")
        # Without statistics SQLite would rather scan the host's part of the primary key.
        return text.replace("{by_key}", " INDEXED BY ix_destination_minutes_key")

    def apply(self, conn: sa.Connection, rows: Sequence[tuple]) -> None:
        """Add rows (audit_events tuples just inserted, none of them stored before)."""
        new = list(map(_ROW_FIELDS, rows))
        if self.postgresql:
            # Writers of the same host (persist and an import) take turns: each must see the
            # other's late-allows and blocks. SQLite's BEGIN IMMEDIATE already serializes.
            for host in sorted({r[0] for r in new}):
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(1936484707, hashtext(%s))",
                                     (host,))
        batch = gather(new)
        keys = batch.blocks | batch.late.keys()
        stored = self._late_of(conn, keys) if keys else {}
        moved = {k: ts for k, ts in batch.late.items() if ts > stored.get(k, "")}
        deltas = aggregate(batch, {**stored, **moved})
        if moved:
            # Before the batch's own groups are written: what is found is stored rows only.
            fresh = {r[0] for r in rows}
            flip(deltas, [f for key, last in sorted(moved.items())
                          for f in self._supersede(conn, key, last, fresh)])
        self._write(conn, deltas, moved)
        if deltas.refresh:
            self._respan(conn, deltas.refresh)

    def _late_of(self, conn: sa.Connection, keys: set[tuple]) -> dict[tuple, str]:
        """The stored latest late-allow of each key that has one."""
        found: dict[tuple, str] = {}
        by_host: dict[str, list[tuple]] = {}
        for key in keys:
            by_host.setdefault(key[0], []).append(key)
        for host, host_keys in by_host.items():
            if len(host_keys) >= _LATE_SCAN_FROM:
                # A flood of new destinations brings thousands of keys, and a host has few
                # late-allowed keys: reading all of those is one short range of the primary
                # key, where a lookup per key would cost more than the row's own insert.
                rows = conn.exec_driver_sql(self.sql["host_late"], (host, _LATE_SCAN_MAX + 1))
                late = {(host, ip, port, protocol): last for ip, port, protocol, last in rows}
                if len(late) <= _LATE_SCAN_MAX:
                    found.update((k, last) for k, last in late.items() if k in keys)
                    continue
            found.update(self._late_by_key(conn, host_keys))
        return found

    def _late_by_key(self, conn: sa.Connection, keys: list[tuple]) -> dict[tuple, str]:
        found: dict[tuple, str] = {}
        ordered = sorted(keys)
        for start in range(0, len(ordered), _LATE_CHUNK):
            chunk = ordered[start:start + _LATE_CHUNK]
            values = ", ".join([self._driver("(?, ?, ?, ?)")] * len(chunk))
            # A join from the keys, so each is one lookup of late_keys' primary key.
            sql = (f"WITH k (host, dst_ip, dst_port, protocol) AS (VALUES {values}) "
                   "SELECT l.host, l.dst_ip, l.dst_port, l.protocol, l.last_late "
                   "FROM k JOIN late_keys AS l ON l.host = k.host AND l.dst_ip = k.dst_ip "
                   "AND l.dst_port = k.dst_port AND l.protocol = k.protocol")
            params = tuple(v for key in chunk for v in key)
            for host, ip, port, protocol, last in conn.exec_driver_sql(sql, params):
                found[(host, ip, port, protocol)] = last
        return found

    def _supersede(self, conn: sa.Connection, key: tuple, late: str,
                   fresh: set[str]) -> list[Flipped]:
        """Mark the stored counted blocks of key at or before late superseded, minute group
        by minute group; what changed, for the other rollups."""
        flipped, updates = [], []
        for minute, destination, process, rule, first, last, counted in conn.exec_driver_sql(
                self.sql["counted_groups"], (*key, late)).fetchall():
            group = (key[0], minute, *key[1:], "connection_blocked", destination, process, rule)
            if last <= late:
                change = Flipped(group, counted, None, None)
            else:
                # Counted rows on both sides of the late-allow: only its own minute's group
                # can be so; its rows (stored before this batch) are counted one by one.
                times = sorted(ts for event_id, ts in conn.exec_driver_sql(
                    self.sql["group_rows"], (first, last, *key, process, rule, destination))
                    if event_id not in fresh)
                after = [ts for ts in times if ts > late]
                change = Flipped(group, len(times) - len(after), after[0] if after else None,
                                 after[-1] if after else None)
            if change.rows:
                flipped.append(change)
                updates.append((change.rows, change.counted_first, change.counted_last,
                                *group))
        if updates:
            conn.exec_driver_sql(self.sql["set_group"], updates)
        return flipped

    def _write(self, conn: sa.Connection, deltas: Deltas, moved: dict[tuple, str]) -> None:
        batches = {
            "late": [(*k, ts) for k, ts in moved.items()],
            "minutes": [(*k, *v) for k, v in deltas.minutes.items()],
            "days": [(*k, *v) for k, v in deltas.days.items()],
            "groups": [(*k, *v) for k, v in deltas.groups.items()],
            "totals": [(*k, *v) for k, v in deltas.totals.items()],
        }
        for name, rows in batches.items():
            if rows:
                _UPSERTS[name].write(conn, rows, self.postgresql)

    def _respan(self, conn: sa.Connection, totals: set[tuple]) -> None:
        """Counted first and last of all-time groups that lost counted rows."""
        updates = []
        for key in sorted(totals):
            host, destination, port, protocol, process, kind, ip, rule = key
            span = conn.exec_driver_sql(self.sql["total_span"], (
                host, ip, port, protocol, kind, destination, process, rule)).one()
            updates.append((*span, *key))
        conn.exec_driver_sql(self.sql["set_total"], updates)


# SQLite's rows not in the rollups yet (0009): read back in chunks, oldest first.
_EVENT_TYPE = COLUMNS.index("event_type")
_MARK_SQL = "SELECT last_id FROM rollup_progress"
_SET_MARK_SQL = "UPDATE rollup_progress SET last_id = ?"
_UNROLLED_SQL = (f"SELECT id, {', '.join(COLUMNS)} FROM audit_events WHERE id > ? "
                 "ORDER BY id LIMIT ?")
CATCH_UP_CHUNK = 8192
# A deferring writer keeps up once this many rows wait: each view reads them all.
ROLLUP_LAG_MAX = 1_000_000

# Retention: each batch is one short transaction, so a writer waits for at most one.
PRUNE_BATCH = 5_000


class Pruned(NamedTuple):
    rows: int     # audit_events rows deleted
    minutes: int  # activity_minutes rows deleted (the timeline's buckets before the cutoff)
    done: bool    # no older row is left

_PRUNE_ROWS = sa.text("DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events "
                      "WHERE timestamp < :before ORDER BY timestamp LIMIT :limit)")
_PRUNED_LAST_ID = sa.text("SELECT MAX(id) FROM (SELECT id FROM audit_events "
                          "WHERE timestamp < :before ORDER BY timestamp LIMIT :limit) AS p")
_PRUNE_MINUTES = (sa.text("DELETE FROM activity_minutes WHERE minute < :minute"),
                  sa.text("DELETE FROM destination_minutes WHERE minute < :minute"))


# The checkpointer copies the WAL into the database file right after each commit; if it falls
# behind and the WAL outgrows this, the writer checkpoints too.
WAL_LIMIT_BYTES = 64 * 1024 * 1024


class _Checkpointer:
    """Checkpoints a SQLite file's WAL on a connection and thread of its own.

    SQLite would otherwise do it inside the writer's commit every 1,000 pages: copying the
    pages and syncing the file then holds up the next batch. Here the copying runs in
    SQLite's C code beside the writer (no GIL held) and never blocks it (PASSIVE).

    The WAL starts over from its beginning only at a transaction that begins with every
    page copied, and the writer's journal_size_limit (_engine) then shrinks the file back to
    limit_bytes. Without that limit the file kept its largest size, and from then on the
    writer copied every commit's pages itself: in a scan of 300,000 new destinations, 29
    commits of 37 (benchmarks/persist_throughput.py --records 300000 --destinations 300000
    stores about 15% more records a second with it). When the file has grown past the limit
    anyway (a reader held the WAL, or under a flood the thread was still copying whenever the
    writer's next transaction began: a million datagrams grew it to 280 MB), the writer
    waits for the thread's pass in progress and copies the rest itself, so that its next
    transaction starts the WAL over.
    """

    PASS_WAIT_S = 1.0  # the writer's wait for the thread's pass (20-200 ms under a flood)

    def __init__(self, path: Path, limit_bytes: int) -> None:
        self.path, self.limit_bytes = path, limit_bytes
        self.on_writer = 0  # checkpoints the writer made itself
        self._pass = threading.Lock()  # held by whichever is checkpointing: one at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sluice-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import sqlite3

        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            while not self._stop.is_set():
                self._wake.wait(1.0)
                self._wake.clear()
                with self._pass:
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error:
                        pass  # busy or failing: the writer's own checkpoint bounds the WAL
        finally:
            conn.close()

    def committed(self, writer: sqlite3.Connection) -> None:
        """After each commit: wake the thread or, past the limit, checkpoint on the writer."""
        try:
            oversized = os.stat(f"{self.path}-wal").st_size > self.limit_bytes
        except OSError:
            oversized = False
        if not oversized or not self._pass.acquire(timeout=self.PASS_WAIT_S):
            self._wake.set()
            return
        import sqlite3

        try:
            self.on_writer += 1
            writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            pass  # the commit is safe in the WAL; a later checkpoint copies it (disk full)
        finally:
            self._pass.release()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)


def _mark(conn: sa.Connection) -> int:
    """SQLite: the last audit_events id the rollups count (rollup_progress)."""
    return int(conn.exec_driver_sql(_MARK_SQL).scalar_one())


class AuditStore:
    """The single writer of audit_events: batched inserts, one transaction per batch."""

    def __init__(self, url: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS,
                 gid: int | None = None, wal_limit_bytes: int = WAL_LIMIT_BYTES,
                 defer_rollups: bool = False) -> None:
        """gid: SLUICE_GROUP's, for a database file this creates (pipeline/private.py).
        wal_limit_bytes: how far a SQLite file's WAL may grow (_Checkpointer).
        defer_rollups: SQLite leaves each batch's rows out of the rollups (but a late-allow's
        batch, or beyond ROLLUP_LAG_MAX rows) until catch_up adds them."""
        path = _sqlite_file(sa.make_url(url)) if url.startswith("sqlite") else None
        self.engine, self.url = _engine(
            url, readonly=False, busy_timeout_ms=busy_timeout_ms, gid=gid,
            wal_limit_bytes=wal_limit_bytes if path is not None else None)
        self._checkpointer = (_Checkpointer(path, wal_limit_bytes) if path is not None
                              else None)
        dialect = self.engine.dialect
        insert = dialect_insert(dialect.name, audit_events).on_conflict_do_nothing(
            index_elements=["event_id"])
        compiled = insert.compile(dialect=dialect, column_keys=list(COLUMNS))
        if compiled.positional and list(compiled.positiontup or ()) != list(COLUMNS):
            raise StoreError(f"{self.url}: unexpected parameter order from {dialect.name}")
        self._insert_sql = compiled.string
        self._positional = compiled.positional
        self._copy = dialect.name == "postgresql"
        self._rollups = _Rollups(dialect.name)
        # SQLite keeps a mark of the rows its rollups count (0009); defer_rollups leaves a
        # batch's rows to catch_up, for a writer that has records waiting.
        self._marked = path is not None
        self.defer_rollups = defer_rollups and self._marked
        self.written_lag = 0  # rows the rollups lacked after this writer's last write

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
            with collector_paused(), self.engine.connect() as conn:
                stored = self._insert(conn, events)
                self._committed(conn)
                return stored
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as err:
            raise StoreError(f"{self.url}: {_one_line(err)}") from None
        except (sa.exc.SQLAlchemyError, ValueError, OverflowError) as err:
            # Integrity and data errors, and values the driver cannot bind.
            raise StoreRejected(f"{self.url}: {_one_line(err)}") from None

    def _committed(self, conn: sa.Connection) -> None:
        """After each write transaction (the WAL's checkpoints, _Checkpointer)."""
        if self._checkpointer is not None:  # SQLite: its driver is the sqlite3 module
            import sqlite3

            driver = conn.connection.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            self._checkpointer.committed(driver)

    def _insert(self, conn: sa.Connection, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        with conn.begin() as tx:
            rows = list(map(as_row, events))
            before = self._last_id(conn)
            if self._execute(conn, rows) == len(events):
                self._roll_up(conn, rows, before)
                return list(events)
            tx.rollback()
        # Some ids are stored already (a batch written again): insert only the others, so
        # the caller learns exactly which records are new rows and the rollups count each
        # row once.
        with conn.begin():
            fresh = self._unstored(conn, events)
            rows = list(map(as_row, fresh))
            before = self._last_id(conn)
            self._execute(conn, rows)
            self._roll_up(conn, rows, before)
            return fresh

    def _last_id(self, conn: sa.Connection) -> int:
        """SQLite: the last row's id (a writer's transaction holds the file's only write
        lock, so the rows it inserts next are the ids after it)."""
        if not self._marked:
            return 0
        return int(conn.exec_driver_sql("SELECT COALESCE(MAX(id), 0) FROM audit_events")
                   .scalar_one())

    def _roll_up(self, conn: sa.Connection, rows: list[tuple], before: int) -> None:
        """Add rows just inserted (ids after before) to the rollups, or leave them to
        catch_up: only a deferring SQLite writer does, and never a late-allow, so rows left
        behind never supersede rows counted already (the views classify them by late_keys,
        which every late-allow has updated before it is stored)."""
        self.written_lag = 0
        if not self._marked:
            self._rollups.apply(conn, rows)
            return
        mark = _mark(conn)
        if mark > before:  # every newer row was pruned, and SQLite gives their ids again
            mark = before
            conn.exec_driver_sql(_SET_MARK_SQL, (mark,))
        if self.defer_rollups and not any(row[_EVENT_TYPE] == LATE_ALLOWED for row in rows):
            behind = before + len(rows) - mark
            if behind > ROLLUP_LAG_MAX:  # keep up as fast as rows come
                behind -= self._catch_up(conn, mark, len(rows))
            self.written_lag = behind
            return
        if mark < before:  # rows left behind go first, in the order they were stored
            self._catch_up(conn, mark, before - mark)
        self._rollups.apply(conn, rows)
        conn.exec_driver_sql(_SET_MARK_SQL, (before + len(rows),))

    def catch_up(self, limit: int) -> int:
        """Add up to limit of the rows a deferring writer left behind to the rollups, in
        one transaction, oldest first; returns how many (0: the rollups count every row)."""
        if not self._marked:
            return 0
        try:
            with collector_paused(), self.engine.connect() as conn:
                with conn.begin():
                    mark = _mark(conn)
                    added = self._catch_up(conn, mark, limit)
                if added:
                    self._committed(conn)
                return added
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: {_one_line(err)}") from None

    def rollup_lag(self) -> int:
        """Rows stored that the rollups do not count yet (the views add them)."""
        if not self._marked:
            return 0
        try:
            with self.engine.connect() as conn:
                return max(0, self._last_id(conn) - _mark(conn))
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: {_one_line(err)}") from None

    def _catch_up(self, conn: sa.Connection, mark: int, limit: int) -> int:
        added = 0
        while added < limit:
            rows = conn.exec_driver_sql(_UNROLLED_SQL, (mark, min(limit - added,
                                                                  CATCH_UP_CHUNK))).all()
            if not rows:
                break
            self._rollups.apply(conn, [row[1:] for row in rows])
            mark, added = rows[-1][0], added + len(rows)
        if added:
            conn.exec_driver_sql(_SET_MARK_SQL, (mark,))
        return added

    def _execute(self, conn: sa.Connection, rows: list[tuple]) -> int:
        if not rows:
            return 0
        if self._copy:
            return _copy_insert(conn, rows)
        params = (rows if self._positional
                  else [dict(zip(COLUMNS, row, strict=True)) for row in rows])
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
        transaction; with the last of them, also the per-minute rollups before it.

        The daily and all-time rollups, and late_keys, are kept: they go on counting the
        pruned past.
        """
        try:
            with self.engine.begin() as conn:
                if self._marked:
                    self._roll_up_pruned(conn, before, limit)
                rows = conn.execute(_PRUNE_ROWS, {"before": before, "limit": limit}).rowcount
                if rows == limit:
                    return Pruned(rows, 0, False)
                minute = {"minute": before[:16] + "Z"}
                conn.execute(_PRUNE_MINUTES[1], minute)
                return Pruned(rows, conn.execute(_PRUNE_MINUTES[0], minute).rowcount, True)
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: pruning failed: {_one_line(err)}") from None

    def _roll_up_pruned(self, conn: sa.Connection, before: str, limit: int) -> None:
        """The daily and all-time rollups outlive the rows: count the ones about to go."""
        mark = _mark(conn)
        last: int | None = conn.execute(_PRUNED_LAST_ID,
                                        {"before": before, "limit": limit}).scalar()
        if last is not None and last > mark:
            self._catch_up(conn, mark, last - mark)

    def prune(self, before: str, limit: int = PRUNE_BATCH) -> Pruned:
        """Every audit row older than before, in batches of limit; what was deleted."""
        rows = 0
        while True:
            batch = self.prune_batch(before, limit)
            rows += batch.rows
            if batch.done:
                return batch._replace(rows=rows)

    def events_after(self, event_id: str | None, host: str,
                     limit: int = 1_000_000) -> list[AuditEvent]:
        """This host's rows written after the row of event_id (every one for None), in the
        order they were written ([] when event_id is not stored)."""
        table = audit_events
        try:
            with self.engine.connect() as conn:
                after = 0 if event_id is None else conn.execute(sa.select(table.c.id).where(
                    table.c.event_id == event_id)).scalar()
                if after is None:
                    return []
                rows = conn.execute(
                    sa.select(*(table.c[name] for name in COLUMNS))
                    .where(table.c.id > after, table.c.host == host)
                    .order_by(table.c.id).limit(limit)).all()
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: {_one_line(err)}") from None
        return [from_row(row) for row in rows]

    def last_event_id(self, host: str) -> str:
        """The event id of this host's last row written ("" when it has none)."""
        table = audit_events
        try:
            with self.engine.connect() as conn:
                value = conn.execute(sa.select(table.c.event_id).where(table.c.host == host)
                                     .order_by(table.c.id.desc()).limit(1)).scalar()
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: {_one_line(err)}") from None
        return value or ""

    def remember_delivered(self, rows: Sequence[DeliveredDestination]) -> None:
        """Store notify's delivered destinations in one transaction; one stored before is
        kept as it is. StoreError if the database is unavailable."""
        if not rows:
            return
        # Plain tuples through the driver, as the audit rows go: a storm's summary can bring
        # thousands, and Connection.execute's per-value binding more than doubled their cost.
        values = [(r.host, r.destination, r.hostname, r.ip, r.port, r.protocol,
                   sql_timestamp(r.first_seen_ns), sql_timestamp(r.delivered_ns)) for r in rows]
        try:
            with self.engine.connect() as conn:
                with conn.begin():
                    _REMEMBER.write(conn, values, self._copy)
                self._committed(conn)  # a storm's summary alone can grow the WAL far
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: cannot store delivered destinations: "
                             f"{_one_line(err)}") from None

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.engine.dispose()


class DeliveredKeys:
    """The keys this host has delivered, read (read-only) from notified_destinations,
    which persist writes."""

    def __init__(self, url: str, host: str) -> None:
        self.url, self.host = url, host
        self.engine: sa.Engine | None = None

    def ready(self) -> bool:
        """Whether persist's migrations have created the table yet (a database that is
        not there or down for now is not ready either)."""
        try:
            if self.engine is None:
                self.engine = open_readonly(self.url)
            return sa.inspect(self.engine).has_table(notified_destinations.name)
        except (StoreError, sa.exc.SQLAlchemyError):
            return False

    def load(self) -> FingerprintSet:
        """Streamed into fingerprints: never a set of every key as text at once."""
        column = notified_destinations.c
        query = sa.select(column.destination).where(column.host == self.host)
        assert self.engine is not None, "ready() opened it"
        try:
            with self.engine.connect() as conn:
                return FingerprintSet(conn.execute(query).scalars())
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: cannot read notified destinations: "
                             f"{type(err).__name__}") from None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
