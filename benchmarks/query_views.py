"""Query time of every documented view against the plain scan of the same question.

Loads N audit rows through the real write path (AuditStore.insert, as persist and `sluice
import` store them: rows and rollups in one transaction per 8,192-row batch) and prints the
load rate. The rows: 5 hosts, 1,000,000 rows a day (10,000,000 rows are ten days), 5,000
destinations, 60 processes; 60% allowed, 33% blocked, 3% late-allowed (so that blocks are
superseded), 2% dns_blocked, 2% protocol blocks.

Then, per view, `SELECT * FROM <view>` read to the last row through the read-only path of
`sluice query`, against the baseline: the same question answered by a plain scan of
audit_events (the view as migration 0003 defined it, created beside it for this run). The
per-row views (audit_events_classified, audit_events_counted) return one row per record, so
both sides ask them for the last five minutes only. Each view is timed on one open read-only
connection, three times (the best is kept); the plain scan once.

Last, the wall-clock time of the `sluice query` command over a rollup view, start-up
included, against `python -c pass` (the interpreter's own start-up) in the same run.

The run ends on its condition: every view under 50 ms (up to 1,000,000 rows) or 0.5 s (up
to 10,000,000 rows), and the command under 0.3 s; exit 1 otherwise.

    .venv/bin/python benchmarks/query_views.py [--rows 1000000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.audit.records import AuditEvent, sql_timestamp  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from pipeline.audit.store import (VIEWS, VIEWS_0003, VIEWS_0009, AuditStore,  # noqa: E402
                                  open_readonly, views_0003)
from tests.support.postgres import postgres_schema  # noqa: E402

T0 = 1_767_225_600_000_000_000
DAY_NS = 86_400 * 1_000_000_000
ROWS_PER_DAY = 1_000_000
BATCH = 8_192
PER_ROW = ("audit_events_classified", "audit_events_counted")
RECENT_NS = 5 * 60 * 1_000_000_000  # the per-row views are asked for the last five minutes
DAILY = """CREATE VIEW plain_timeline_daily AS
SELECT host, substr(minute, 1, 10) AS day, SUM(events) AS events, SUM(allowed) AS allowed,
       SUM(blocked) AS blocked, SUM(superseded) AS superseded,
       SUM(late_allowed) AS late_allowed, SUM(dns_blocked) AS dns_blocked
FROM plain_timeline GROUP BY host, substr(minute, 1, 10)"""


def event_type(i: int) -> str:
    share = i % 100
    if share < 60:
        return "connection_allowed"
    if share < 93:
        return "connection_blocked"
    if share < 96:
        return "connection_late_allowed"
    return "dns_blocked" if share < 98 else "protocol_blocked"


def record(i: int) -> AuditEvent:
    kind = event_type(i)
    j = i % 5_000
    ns = T0 + i * DAY_NS // ROWS_PER_DAY
    if kind == "dns_blocked":
        return AuditEvent(ns, kind, dst_hostname=f"h{j}.example.com", would_deny=True,
                          event_id=f"bench-{i:010d}", host=f"host{i % 5}")
    gre = kind == "protocol_blocked"
    return AuditEvent(
        ns, kind, src_ip="10.0.0.2", dst_ip=f"10.1.{j // 250}.{j % 250}",
        dst_hostname=f"h{j}.example.com" if j % 5 else "",
        dst_port=0 if gre else 80 if i % 7 == 0 else 443, protocol="GRE" if gre else "TCP",
        process=f"proc{i % 60}", pid=1000 + i % 60,
        matched_rule="*.example.com" if kind == "connection_late_allowed" else "",
        would_deny=kind not in ("connection_allowed", "connection_late_allowed"),
        event_id=f"bench-{i:010d}", host=f"host{i % 5}")


def load(url: str, rows: int) -> float:
    """Records/s stored through AuditStore.insert, rollups included."""
    store = AuditStore(url)
    store.migrate()
    elapsed = 0.0
    try:
        for first in range(0, rows, BATCH):
            batch = [record(i) for i in range(first, min(rows, first + BATCH))]
            started = time.perf_counter()
            store.insert(batch)
            elapsed += time.perf_counter() - started
        with store.engine.begin() as conn:
            names = "|".join(VIEWS_0003)
            for statement in views_0003(conn.dialect.name):
                conn.exec_driver_sql(re.sub(rf"(CREATE VIEW |FROM )({names})\b",
                                            r"\1plain_\2", statement))
            conn.exec_driver_sql(DAILY)
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("ANALYZE")
    finally:
        store.close()
    return rows / elapsed


def best_of(conn: sa.Connection, sql: str, repeat: int = 3) -> tuple[float, int]:
    """Seconds to run sql and fetch every row (best of repeat), and the row count."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        count = len(conn.exec_driver_sql(sql).fetchall())
        times.append(time.perf_counter() - started)
    return min(times), count


def question(view: str, rows: int) -> str:
    if view.removeprefix("plain_") in PER_ROW:
        recent = sql_timestamp(T0 + rows * DAY_NS // ROWS_PER_DAY - RECENT_NS)
        return f"SELECT * FROM {view} WHERE timestamp >= '{recent}'"
    return f"SELECT * FROM {view}"


def report(label: str, url: str, rows: int, limit: float) -> bool:
    print(f"{label}: {rows:,} rows stored through AuditStore.insert at {load(url, rows):,.0f} "
          "records/s (rows and rollups)")
    engine = open_readonly(url)  # the connection `sluice query` opens
    ok = True
    with engine.connect() as conn:
        best_of(conn, "SELECT count(*) FROM audit_events", 1)  # every query reads a warm store
        print(f"  {'view':<26} {'rollups':>10} {'plain scan':>11} {'speed-up':>9} {'rows':>9}")
        for view in VIEWS:
            if view in VIEWS_0009:  # parts of the others, with no question of their own
                continue
            seconds, count = best_of(conn, question(view, rows))
            plain, plain_count = best_of(conn, question(f"plain_{view}", rows), 1)
            if count != plain_count:
                print(f"  {view}: {count} rows, but the plain scan has {plain_count}")
                ok = False
            ok &= seconds < limit
            print(f"  {view:<26} {seconds * 1000:8.1f}ms {plain * 1000:9.1f}ms "
                  f"{plain / seconds:8.0f}x {count:>9,}")
    engine.dispose()
    return ok


def command_time(url: str) -> tuple[float, float]:
    """Best wall-clock of `sluice query` over a rollup view, and of `python -c pass`."""
    sluice = [str(Path(sys.executable).parent / "sluice"), "query",
              "SELECT * FROM blocked_destinations ORDER BY attempts DESC LIMIT 20", "--db", url]

    def best(argv: list[str]) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - started)
        return min(times)

    return best(sluice), best([sys.executable, "-c", "pass"])


def sqlite_figures(rows: int, limit: float) -> bool:
    with tempfile.TemporaryDirectory(prefix="sluice-views-bench-") as tmp:
        url = f"sqlite:///{tmp}/audit.db"
        ok = report("SQLite", url, rows, limit)
        command, python = command_time(url)
        print(f"  `sluice query` over blocked_destinations: {command * 1000:.0f} ms wall-clock; "
              f"`python -c pass`: {python * 1000:.0f} ms ({command / python:.1f}x)")
        return ok and command < 0.3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", default="", help="PostgreSQL URL (a schema is created)")
    parser.add_argument("--no-sqlite", action="store_true",
                        help="PostgreSQL only (a 10,000,000-row load takes a while per store)")
    args = parser.parse_args()
    if args.no_sqlite and not args.postgres:
        parser.error("--no-sqlite needs --postgres")
    limit = 0.05 if args.rows <= 1_000_000 else 0.5
    ok = True
    if not args.no_sqlite:
        ok &= sqlite_figures(args.rows, limit)
    if args.postgres:
        with postgres_schema(args.postgres) as url:
            ok &= report("PostgreSQL", url, args.rows, limit)
    command = "" if args.no_sqlite else " and the command under 300 ms"
    print(f"every view under {limit * 1000:.0f} ms{command}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
