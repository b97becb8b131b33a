"""Query time of every shipped view on a one-million-row store (SQLite, and PostgreSQL).

Loads N audit rows (5 hosts, one day, 5,000 destinations, 60 processes; 60% allowed, 33%
blocked, 3% late-allowed so that blocks get superseded, 2% dns_blocked, 2% protocol blocks)
with executemany, then times `SELECT * FROM <view>` read to the last row through the
read-only query path `sluice query` uses.

Baselines, measured in the same run on the same store: `SELECT count(*) FROM audit_events`
(a plain scan) and `SELECT host, event_type, count(*) ... GROUP BY host, event_type` (a
plain aggregation over every row); each view's time is printed as a ratio of both.

    .venv/bin/python benchmarks/query_views.py [--rows 1000000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.audit import sql_timestamp  # noqa: E402
from pipeline.query import run_query  # noqa: E402
from pipeline.store import COLUMNS, VIEWS, AuditStore, audit_events  # noqa: E402
from tests.conftest import postgres_schema  # noqa: E402

T0 = 1_767_225_600_000_000_000
DAY_NS = 86_400 * 1_000_000_000
CHUNK = 50_000
BASELINES = {
    "count(*)": "SELECT count(*) FROM audit_events",
    "GROUP BY scan": "SELECT host, event_type, count(*) FROM audit_events "
                     "GROUP BY host, event_type",
}


def event_type(i: int) -> str:
    share = i % 100
    if share < 60:
        return "connection_allowed"
    if share < 93:
        return "connection_blocked"
    if share < 96:
        return "connection_late_allowed"
    return "dns_blocked" if share < 98 else "protocol_blocked"


def row(i: int, rows: int) -> tuple:
    kind = event_type(i)
    j = i % 5_000
    dns = kind == "dns_blocked"
    protocol = "GRE" if kind == "protocol_blocked" else "" if dns else "TCP"
    values = {
        "event_id": f"bench-{i:010d}", "host": f"host{i % 5}",
        "timestamp": sql_timestamp(T0 + i * DAY_NS // rows), "event_type": kind,
        "src_ip": "" if dns else "10.0.0.2", "dst_ip": "" if dns else f"10.1.{j // 250}.{j % 250}",
        "dst_hostname": f"h{j}.example.com" if j % 5 else "",
        "dst_port": 0 if dns or protocol == "GRE" else 80 if i % 7 == 0 else 443,
        "protocol": protocol, "process": "" if dns else f"proc{i % 60}", "pid": 1000 + i % 60,
        "matched_rule": "*.example.com" if kind == "connection_late_allowed" else "",
        "auto_allowed_type": "", "cname_chain": "", "mid_stream": False,
        "would_deny": kind not in ("connection_allowed", "connection_late_allowed"),
        "blocked": False, "packets": 1,
    }
    return tuple(values[c] for c in COLUMNS)


def load(url: str, rows: int) -> float:
    """Seconds to insert rows with executemany, in chunks of one transaction each."""
    store = AuditStore(url)
    store.migrate()
    dialect = store.engine.dialect
    compiled = audit_events.insert().compile(dialect=dialect, column_keys=list(COLUMNS))
    started = time.monotonic()
    raw = store.engine.raw_connection()
    try:
        for first in range(0, rows, CHUNK):
            chunk = [row(i, rows) for i in range(first, min(rows, first + CHUNK))]
            params = chunk if compiled.positional else [dict(zip(COLUMNS, r)) for r in chunk]
            cursor = raw.cursor()
            cursor.executemany(compiled.string, params)
            cursor.close()
            raw.commit()
        if dialect.name == "postgresql":
            raw.cursor().execute("ANALYZE audit_events")
            raw.commit()
    finally:
        raw.close()
        store.close()
    return time.monotonic() - started


def timed(url: str, sql: str) -> tuple[float, int]:
    started = time.monotonic()
    with run_query(url, sql) as (_, result):
        count = sum(1 for _ in result)
    return time.monotonic() - started, count


def report(label: str, url: str, rows: int) -> None:
    print(f"{label}: {rows:,} rows loaded with executemany in {load(url, rows):.1f} s")
    timed(url, BASELINES["count(*)"])  # warm the cache: every query below reads a warm store
    base = {name: timed(url, sql)[0] for name, sql in BASELINES.items()}
    for name, seconds in base.items():
        print(f"  baseline {name:<24} {seconds * 1000:9.1f} ms")
    for view in VIEWS:
        seconds, count = timed(url, f"SELECT * FROM {view}")
        ratios = ", ".join(f"{seconds / b:.1f}x {n}" for n, b in base.items())
        print(f"  {view:<33} {seconds * 1000:9.1f} ms  {count:>9,} rows  ({ratios})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", default="", help="PostgreSQL URL (a schema is created)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-views-bench-") as tmp:
        report("SQLite", f"sqlite:///{tmp}/audit.db", args.rows)
    if args.postgres:
        with postgres_schema(args.postgres) as url:
            report("PostgreSQL", url, args.rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
