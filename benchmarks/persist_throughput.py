"""Records/s that persist can store: AuditStore.write + AuditLogger.write, against a baseline.

sluice's side is what persist does per batch while records keep coming: one transaction with
the rows (on SQLite it adds them to the rollups, pipeline/audit/rollups.py, once records stop:
that catch-up is timed apart and printed), then the Go-compatible JSONL lines. "in-commit" is
the same with the rollups in each transaction, as `sluice import` and PostgreSQL's writers do.

The baseline, measured in the same run on the same machine, is the least any writer must do
for the same rows: plain sqlite3 executemany of ready-made tuples into the same table (WAL,
synchronous=NORMAL, the same indexes) with no rollups, and the fastest encoder at hand
(msgspec) writing plain dicts of the records as lines, without the omit-empty and escaping
rules of the Go form. Both run SQLite as persist does, without its memory statistics
(pipeline/audit/sqlite_memory.py). The ratio is what sluice costs on top. Like persist, the
run leaves what it built before timing out of the cycle collector's passes. Each variant
runs several times into fresh files, the two taking turns, and keeps its best: the machine's
noise only ever adds time.

The flood has --destinations distinct destinations (a name each): 1,000 by default; as many as
--records for a scan that never repeats one, where every rollup group is new.

notify's delivered destinations (a storm's summary can bring one per scanned address) are
timed the same way: persist's chunks of DELIVERED_CHUNK, one transaction each, against plain
executemany of ready-made tuples into the same table. They have no goal of their own; what
they cost comes out of the audit writes' time.

The run ends on the goal: sluice stores at least 150,000 records/s into SQLite and the JSONL
file together (exit 1 otherwise). The load average is printed first: other work on the
machine only lowers the figures.

Usage: .venv/bin/python benchmarks/persist_throughput.py [--records 100000] [--batch 8192]
       [--delivered 100000]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from pipeline.audit.records import AuditEvent, AuditLogger, new_event_id
from pipeline.settings import Settings
from pipeline.events import DeliveredDestination
from pipeline.stages.persist import COMMIT_FACTOR, DELIVERED_CHUNK
from pipeline.audit.sqlite_memory import skip_memory_statistics
from pipeline.audit.store import COLUMNS, AuditStore, as_row
from pipeline.audit.timestamps import sql_timestamp

T0 = 1_767_225_600_000_000_000
INSERT = (f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES "
          f"({', '.join('?' * len(COLUMNS))}) ON CONFLICT (event_id) DO NOTHING")


def make_records(n: int, destinations: int = 1_000) -> list[AuditEvent]:
    """A flood: blocked TCP to some destinations (a name each), some allowed DNS, some CNAMEs."""
    records = []
    for i in range(n):
        ns = T0 + i * 20_000  # 50,000 records/s
        d = i % destinations
        record = AuditEvent(ns, "connection_blocked", "10.0.0.2",
                            f"10.{d >> 16 & 255}.{d >> 8 & 255}.{d & 255}",
                            f"host{d}.example.com", 443, "TCP", "curl", 4000 + i % 300,
                            would_deny=True, event_id=new_event_id(ns), host="runner-17")
        if i % 10 == 0:
            record.event_type, record.would_deny = "connection_allowed", False
            record.auto_allowed_type, record.protocol, record.dst_port = "dns", "UDP", 53
        if i % 7 == 0:
            record.cname_chain = [f"alias{i % 50}.example.net", "edge.cdn.example"]
        records.append(record)
    return records


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def sluice_run(batches: list[list[AuditEvent]], workdir: Path,
               defer: bool = True) -> tuple[float, float, float]:
    """persist's way (defer): the rows while records keep coming, then the rollups' catch-up
    (the third figure); without defer, the rollups in each commit (sluice import's way)."""
    store = AuditStore(f"sqlite:///{workdir / 'audit.db'}", defer_rollups=defer)
    store.migrate()
    logger = AuditLogger(workdir / "audit.jsonl", audit_mode=True)
    sql = jsonl = 0.0
    for batch in batches:  # persist's order: SQL commit, then the same records' lines
        start = time.perf_counter()
        store.write(batch)
        middle = time.perf_counter()
        logger.write(batch)
        sql, jsonl = sql + middle - start, jsonl + time.perf_counter() - middle
    logger.close()
    start = time.perf_counter()
    while store.catch_up(COMMIT_FACTOR * 512):
        pass
    caught_up = time.perf_counter() - start
    store.close()
    return sql, jsonl, caught_up


def sluice_in_commit_run(batches: list[list[AuditEvent]],
                         workdir: Path) -> tuple[float, float, float]:
    return sluice_run(batches, workdir, defer=False)


def baseline_run(batches: list[tuple[list[tuple], list[dict]]],
                 workdir: Path) -> tuple[float, float]:
    import sqlite3  # here: SQLite starts as persist starts it (main)

    AuditStore(f"sqlite:///{workdir / 'audit.db'}").migrate()  # the same schema and indexes
    conn = sqlite3.connect(workdir / "audit.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    sql = jsonl = 0.0
    with open(workdir / "audit.jsonl", "ab") as out:
        for rows, dicts in batches:
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, rows)
            conn.execute("COMMIT")
            middle = time.perf_counter()
            out.write(LINES.encode_lines(dicts))
            out.flush()
            sql, jsonl = sql + middle - start, jsonl + time.perf_counter() - middle
    conn.close()
    return sql, jsonl


def baseline_batches(records: list[AuditEvent],
                     size: int) -> list[tuple[list[tuple], list[dict]]]:
    """The same tuples sluice inserts and plain dicts, made before timing."""
    rows = [as_row(r) for r in records]
    dicts = [msgspec.structs.asdict(r) for r in records]
    return list(zip(chunks(rows, size), chunks(dicts, size), strict=True))


def delivered_records(n: int) -> list[DeliveredDestination]:
    """A scan's alerts: one per address, delivered 3 ms after its block."""
    records = []
    for d in range(n):
        ip = f"10.{d >> 16 & 255}.{d >> 8 & 255}.{d & 255}"
        records.append(DeliveredDestination("runner-17", f"{ip}:443", "", ip, 443, "TCP",
                                            T0 + d * 20_000, T0 + d * 20_000 + 3_000_000))
    return records


def sluice_delivered(chunked: list[list[DeliveredDestination]],
                     workdir: Path) -> tuple[float, float]:
    store = AuditStore(f"sqlite:///{workdir / 'audit.db'}")
    store.migrate()
    start = time.perf_counter()
    for chunk in chunked:
        store.remember_delivered(chunk)
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed, 0.0


def baseline_delivered(chunked: list[list[tuple]], workdir: Path) -> tuple[float, float]:
    import sqlite3

    AuditStore(f"sqlite:///{workdir / 'audit.db'}").migrate()
    conn = sqlite3.connect(workdir / "audit.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    start = time.perf_counter()
    for rows in chunked:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO notified_destinations VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT (host, destination) DO NOTHING", rows)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed, 0.0


def delivered_figures(n: int, repeat: int) -> None:
    records = delivered_records(n)
    tuples = [(r.host, r.destination, r.hostname, r.ip, r.port, r.protocol,
               sql_timestamp(r.first_seen_ns), sql_timestamp(r.delivered_ns)) for r in records]
    results = best_of_turns({"sluice": (sluice_delivered, chunks(records, DELIVERED_CHUNK)),
                             "baseline": (baseline_delivered, chunks(tuples, DELIVERED_CHUNK))},
                            repeat)
    rates = {name: n / seconds for name, (seconds, _) in results.items()}
    print(f"delivered destinations, {n:,} in chunks of {DELIVERED_CHUNK:,}: sluice "
          f"{rates['sluice']:,.0f}/s, baseline {rates['baseline']:,.0f}/s, ratio "
          f"{rates['sluice'] / rates['baseline']:.2f}")


def best_of_turns(variants: dict, repeat: int) -> dict[str, tuple[float, ...]]:
    """Each variant's best seconds of each part (SQL, JSONL, ...). The variants take turns,
    one run each per round, so a drift of the machine's speed reaches every side alike."""
    times: dict[str, list[tuple[float, ...]]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, (run, batches) in variants.items():
            with tempfile.TemporaryDirectory(prefix="sluice-bench-") as workdir:
                times[name].append(run(batches, Path(workdir)))
    return {name: tuple(map(min, zip(*runs, strict=True))) for name, runs in times.items()}


GOAL = 150_000
LINES = msgspec.json.Encoder()


def main() -> int:
    default_batch = Settings.from_env({}).batch_max * COMMIT_FACTOR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=default_batch,
                        help=f"records per commit (persist's default: {default_batch})")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; best is kept")
    parser.add_argument("--destinations", type=int, default=1_000,
                        help="distinct destinations of the flood (= --records: a scan that "
                             "never repeats one)")
    parser.add_argument("--delivered", type=int, default=100_000,
                        help="notify's delivered destinations to time (0: none)")
    args = parser.parse_args()
    # As in persist: SQLite without its allocation statistics, for both variants alike.
    statistics = "off" if skip_memory_statistics() else "on (could not be turned off)"
    records = make_records(args.records, args.destinations)
    # persist leaves what its start-up built out of the cycle collector's passes
    # (pipeline/loop.py); here that is the records made above, which persist never holds.
    gc.collect()
    gc.freeze()
    print(f"{args.records:,} records to {args.destinations:,} destinations, {args.batch:,} per "
          f"commit, best of {args.repeat} runs; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs; SQLite's memory statistics {statistics}")
    batches = chunks(records, args.batch)
    results = best_of_turns({"sluice": (sluice_run, batches),
                             "in-commit": (sluice_in_commit_run, batches),
                             "baseline": (baseline_run, baseline_batches(records, args.batch))},
                            args.repeat)
    rates = {}
    for name, (sql, jsonl, *_) in results.items():
        rates[name] = [args.records / t for t in (sql, jsonl, sql + jsonl)]
        print(f"{name:>9}: SQL {rates[name][0]:>9,.0f}/s   JSONL {rates[name][1]:>9,.0f}/s   "
              f"both {rates[name][2]:>9,.0f}/s")
    ratios = [s / b for s, b in zip(rates["sluice"], rates["baseline"], strict=True)]
    print(f"    ratio: SQL {ratios[0]:>9.2f}     JSONL {ratios[1]:>9.2f}     "
          f"both {ratios[2]:>9.2f}     (sluice / baseline, higher is better)")
    print(f"sluice's rollups caught up afterwards at {args.records / results['sluice'][2]:,.0f} "
          "records/s (persist adds them once records stop); in-commit: the rollups in each "
          "commit, as `sluice import` and PostgreSQL's writers add them")
    if args.delivered:
        delivered_figures(args.delivered, args.repeat)
    reached = rates["sluice"][2] >= GOAL
    print(f"sluice stores at least {GOAL:,} records/s (SQL and JSONL): "
          f"{'yes' if reached else 'NO'}")
    return 0 if reached else 1


if __name__ == "__main__":
    sys.exit(main())
