"""The rollup-backed views give the answers of a plain recomputation from audit_events.

The recomputation is the views as migration 0003 defined them (pipeline.store.views_0003):
each one a scan of every row. They are created beside the real views as `oracle_<name>`, on
SQLite and on PostgreSQL, and compared after randomized histories: blocks that late-allows
supersede later (and in the same batch, and before the blocks arrive), ties, rows out of
order, batches written twice, an NDJSON import, several hosts, and a new store object (a
restart) between batches. A store filled before the rollups existed is migrated and compared.
"""

import json
import random
import re

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from pipeline.audit.records import AuditEvent, to_json_line
from pipeline.cli.app import app
from pipeline.errors import StoreError
from pipeline.audit import store as store_module
from pipeline.audit.importer import import_file
from pipeline.audit.query import run_query
from pipeline.audit.store import (CGROUP_COLUMNS, COLUMNS, MIGRATIONS, ROLLUP_VIEWS, VIEWS,
                                  VIEWS_0003, AuditStore, as_row, views_0003)

T = 1_767_311_880_000_000_000  # 2026-01-01T23:58:00Z: histories cross a day
S = 1_000_000_000
ORDER = {  # a total order for each view's rows
    "audit_events_classified": "event_id",
    "audit_events_counted": "event_id",
    "blocked_destinations": "host, destination, port, protocol",
    "process_activity": "host, process",
    "dns_blocked_names": "host, name",
    "late_allowed": "host, destination, dst_ip, port, protocol, matched_rule",
    "timeline": "host, minute",
    "timeline_daily": "host, day",
}
COMPARED = [view for view in VIEWS if view in ORDER]  # audit_events_unrolled has no oracle
ORACLE_DAILY = """CREATE VIEW oracle_timeline_daily AS
SELECT host, substr(minute, 1, 10) AS day, CAST(SUM(events) AS BIGINT) AS events,
       CAST(SUM(allowed) AS BIGINT) AS allowed, CAST(SUM(blocked) AS BIGINT) AS blocked,
       CAST(SUM(superseded) AS BIGINT) AS superseded,
       CAST(SUM(late_allowed) AS BIGINT) AS late_allowed,
       CAST(SUM(dns_blocked) AS BIGINT) AS dns_blocked
FROM oracle_timeline GROUP BY host, substr(minute, 1, 10)"""


def add_oracle(url):
    store = AuditStore(url)
    names = "|".join(VIEWS_0003)
    with store.engine.begin() as conn:
        for statement in views_0003(conn.dialect.name):
            conn.exec_driver_sql(re.sub(rf"(CREATE VIEW |FROM )({names})\b", r"\1oracle_\2",
                                            statement))
        conn.exec_driver_sql(ORACLE_DAILY)
    store.close()


def answers(url, view):
    order = ORDER[view.removeprefix("oracle_")]
    with run_query(url, f"SELECT * FROM {view} ORDER BY {order}") as (columns, rows):
        return [dict(zip(columns, row, strict=True)) for row in rows]


def assert_same_answers(url):
    for view in COMPARED:
        got, want = answers(url, view), answers(url, f"oracle_{view}")
        assert got == want, view


def random_history(rng, n):
    """Records over a few keys and about five minutes around midnight, seconds only (ties)."""
    records = []
    for i in range(n):
        host = rng.choice(["h1", "h2", "h3"])
        ip = rng.choice(["1.1.1.1", "2.2.2.2", "3.3.3.3"])
        port, protocol = rng.choice([(443, "TCP"), (443, "UDP"), (80, "TCP")])
        kind = rng.choices(["connection_blocked", "connection_late_allowed",
                            "connection_allowed", "protocol_blocked", "dns_blocked",
                            "existing_connection"], [40, 12, 20, 8, 10, 5])[0]
        name = rng.choice(["", "api.example.com", "cdn.example.com"])
        fields = dict(src_ip="10.0.0.2", dst_ip=ip, dst_hostname=name, dst_port=port,
                      protocol=protocol, process=rng.choice(["", "curl", "git", "node"]),
                      pid=100 + i)
        if kind == "protocol_blocked":
            fields.update(dst_port=0, protocol="GRE")
        if kind == "dns_blocked":
            fields = dict(dst_hostname=rng.choice(["evil.test", "bad.test"]))
        if kind == "connection_late_allowed":
            fields["matched_rule"] = rng.choice(["*.example.com", "api.example.com"])
        records.append(AuditEvent(T + rng.randrange(300) * S, kind, would_deny=True,
                                  event_id=f"r{i:05d}", host=host, **fields))
    return records


def write_randomly(url, records, rng, tmp_path, defer=False):
    """Batches of random sizes, some written twice, one part imported, stores reopened;
    with defer, rows the rollups count later, caught up a few at a time now and then.
    Returns the most rows the rollups lagged behind."""
    store = AuditStore(url, defer_rollups=defer)
    store.migrate()
    position = lagged = 0
    while position < len(records):
        size = rng.randint(1, 40)
        batch = records[position:position + size]
        position += size
        if rng.random() < 0.15:  # as a log line through `sluice import`
            log = tmp_path / f"part{position}.ndjson"
            log.write_text("".join(map(to_json_line, batch)))
            import_file(log, url, "unused")
        else:
            store.write(batch)
        if rng.random() < 0.3:  # written again, partly: nothing may count twice
            store.write(rng.sample(records[:position], min(position, 10)))
        lagged = max(lagged, store.rollup_lag())
        if rng.random() < 0.2:
            store.catch_up(rng.randint(1, 60))
        if rng.random() < 0.2:  # a restart
            store.close()
            store = AuditStore(url, defer_rollups=defer)
    store.close()
    return lagged


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("defer", [False, True], ids=["rolled-up", "deferred"])
def test_every_rollup_view_answers_as_a_plain_recomputation(db_url, tmp_path, seed, defer):
    rng = random.Random(seed)
    records = random_history(rng, 400)
    lagged = write_randomly(db_url, records, rng, tmp_path, defer)
    add_oracle(db_url)
    assert_same_answers(db_url)
    assert sum(r["events"] for r in answers(db_url, "timeline")) == len(records)
    if defer and db_url.startswith("sqlite"):  # PostgreSQL's writers never defer
        assert lagged > 0
        store = AuditStore(db_url)
        store.catch_up(len(records))
        assert store.rollup_lag() == 0
        store.close()
        assert_same_answers(db_url)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scan_max", [100, 1], ids=["host-read-whole", "host-has-too-many"])
def test_a_batch_reading_its_hosts_late_allows_whole_answers_the_same(
        db_url, tmp_path, seed, scan_max, monkeypatch):
    # A flood's batch brings hundreds of keys of one host; here every batch takes that path.
    monkeypatch.setattr(store_module, "_LATE_SCAN_FROM", 1)
    monkeypatch.setattr(store_module, "_LATE_SCAN_MAX", scan_max)
    rng = random.Random(seed)
    records = random_history(rng, 400)
    write_randomly(db_url, records, rng, tmp_path)
    add_oracle(db_url)
    assert_same_answers(db_url)


@pytest.mark.parametrize("written_at", ["0004_notified_destinations", "0005_rollups"])
def test_a_store_of_an_earlier_version_is_migrated_to_the_same_answers(db_url, tmp_path,
                                                                        written_at):
    rng = random.Random(42)
    records = random_history(rng, 300)
    names = [name for name, _ in MIGRATIONS]
    store = AuditStore(db_url)
    store.migrate(MIGRATIONS[:4])  # before 0005_rollups: rows only, as the old writer left them
    old_columns = [c for c in COLUMNS if c not in CGROUP_COLUMNS]  # added by 0008
    quoted = ", ".join(f'"{c}"' for c in old_columns)
    placeholders = ", ".join("?" if store.engine.dialect.name == "sqlite" else "%s"
                             for _ in old_columns)
    # The rows as bound parameters: PostgreSQL takes a flag so as a boolean only (the store
    # itself copies rows in, where 0 and 1 are booleans too).
    flags = {old_columns.index(c) for c in ("mid_stream", "would_deny", "blocked")}
    rows = [tuple(bool(v) if i in flags else v for i, v in enumerate(as_row(r)))
            for r in records[:200]]
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO audit_events ({quoted}) VALUES ({placeholders})",
                             [row[:len(old_columns)] for row in rows])
    store.migrate(MIGRATIONS[:names.index(written_at) + 1])
    assert store.migrate() == names[names.index(written_at) + 1:]
    store.close()
    add_oracle(db_url)
    assert_same_answers(db_url)
    write_randomly(db_url, records[200:], rng, tmp_path)  # and kept in step from then on
    assert_same_answers(db_url)


def blocked(url):
    return [(r["destination"], r["attempts"], r["first_seen"][17:19], r["last_seen"][17:19])
            for r in answers(url, "blocked_destinations")]


def event(seconds, kind, n, **fields):
    return AuditEvent(T + seconds * S, kind, src_ip="10.0.0.2", dst_ip="1.1.1.1",
                      dst_hostname="api.example.com", dst_port=443, protocol="TCP",
                      process="curl", event_id=f"e{n}", host="h", **fields)


def test_a_late_allow_supersedes_stored_blocks_at_or_before_it_only(db_url):
    store = AuditStore(db_url)
    store.migrate()
    store.write([event(1, "connection_blocked", 1), event(5, "connection_blocked", 2),
                 event(9, "connection_blocked", 3)])
    assert blocked(db_url) == [("api.example.com", 3, "01", "09")]
    # Late-allowed at the second block's time: the first two no longer count as blocks.
    store.write([event(5, "connection_late_allowed", 4, matched_rule="*.example.com")])
    assert blocked(db_url) == [("api.example.com", 1, "09", "09")]
    # A block that arrives late, from before the late-allow, is superseded on arrival.
    store.write([event(3, "connection_blocked", 5)])
    assert blocked(db_url) == [("api.example.com", 1, "09", "09")]
    # A later late-allow supersedes the rest; an earlier one changes nothing.
    store.write([event(2, "connection_late_allowed", 6, matched_rule="*.example.com"),
                 event(9, "connection_late_allowed", 7, matched_rule="*.example.com")])
    assert blocked(db_url) == []
    timeline = answers(db_url, "timeline")
    assert [(t["blocked"], t["superseded"], t["late_allowed"]) for t in timeline] == [(0, 4, 3)]
    store.close()


def test_the_rollups_never_count_a_row_twice(db_url):
    store = AuditStore(db_url)
    store.migrate()
    batch = [event(1, "connection_blocked", 1), event(2, "connection_allowed", 2)]
    store.write(batch)
    store.write(batch + [event(3, "connection_blocked", 3)])
    store.write([batch[0], batch[0]])
    assert [t["events"] for t in answers(db_url, "timeline")] == [3]
    assert blocked(db_url) == [("api.example.com", 2, "01", "03")]
    store.close()


def test_the_rollups_and_rows_are_one_transaction(db_url):
    """A batch the database refuses leaves neither rows nor rollup counts behind."""
    store = AuditStore(db_url)
    store.migrate()
    store.write([event(1, "connection_blocked", 1)])
    with pytest.raises(StoreError):  # refused by the database, whichever it is
        store.write([event(2, "connection_blocked", 2), event(3, "connection_blocked", 3,
                                                              pid=1 << 70)])
    assert [t["events"] for t in answers(db_url, "timeline")] == [1]
    assert len(answers(db_url, "audit_events_classified")) == 1
    store.close()


def test_summary_views_read_rollups_not_rows(db_url):
    """Guard against a view that quietly scans audit_events again."""
    store = AuditStore(db_url)
    store.migrate()
    dialect = store.engine.dialect.name
    with store.engine.connect() as conn:
        if dialect == "sqlite":
            sources = {name: sql for name, sql in conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE type = 'view'")}
        else:
            sources = {name: sql for name, sql in conn.exec_driver_sql(
                "SELECT viewname, definition FROM pg_views WHERE schemaname = current_schema()")}
    store.close()
    for view in ROLLUP_VIEWS:
        assert not re.search(r"\baudit_events\b", sources[view]), view
    assert json.dumps(sorted(sources)) == json.dumps(sorted(VIEWS))


def test_a_migration_failing_half_way_leaves_the_store_as_it_was(db_url, tmp_path):
    """0005 drops views and indexes before it fails on a table in its way: all rolled back."""
    store = AuditStore(db_url)
    store.migrate(MIGRATIONS[:4])
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE destinations (note TEXT)")
    with pytest.raises(StoreError, match=r"migration 0005_rollups failed: .*destinations"):
        store.migrate()
    inspector = sa.inspect(store.engine)
    assert "ix_audit_events_dst_ip" in {i["name"] for i in inspector.get_indexes("audit_events")}
    assert "activity_minutes" not in inspector.get_table_names()
    assert set(VIEWS_0003) <= set(inspector.get_view_names())
    store.close()
    log = tmp_path / "one.ndjson"
    log.write_text(to_json_line(event(1, "connection_blocked", 1)))
    result = CliRunner().invoke(app, ["import", str(log), "--db", db_url])
    assert result.exit_code == 5
    assert result.stderr.count("\n") == 1 and "migration 0005_rollups failed" in result.stderr


def test_the_writer_knows_how_far_the_rollups_lag_after_each_write_past_the_bound(
        db_url, monkeypatch):
    """Beyond ROLLUP_LAG_MAX rows waiting, each batch adds as many to the rollups as it
    brings; what the writer reports as waiting after a write is what the store says (persist
    shows it as rollup_lag), not the rows it stored, nor a count that only grows."""
    monkeypatch.setattr(store_module, "ROLLUP_LAG_MAX", 4)
    store = AuditStore(db_url, defer_rollups=True)
    store.migrate()
    lags = db_url.startswith("sqlite")  # PostgreSQL's writers add every row at once
    seen = []
    for n in range(0, 12, 3):
        store.write([event(n + 1, "connection_blocked", n + i) for i in range(3)])
        seen.append((store.written_lag, store.rollup_lag()))
    assert seen == ([(3, 3), (3, 3), (3, 3), (3, 3)] if lags else [(0, 0)] * 4)
    store.write([event(20, "connection_late_allowed", 99, matched_rule="*.example.com")])
    assert (store.written_lag, store.rollup_lag()) == (0, 0)
    store.close()


def test_rows_left_out_of_the_rollups_count_in_every_view_until_caught_up(db_url):
    """persist's writer on SQLite leaves a batch's rows to catch_up; the views add them."""
    store = AuditStore(db_url, defer_rollups=True)
    store.migrate()
    lags = db_url.startswith("sqlite")  # PostgreSQL's writers add every row at once
    store.write([event(1, "connection_blocked", 1), event(5, "connection_blocked", 2),
                 event(9, "connection_blocked", 3)])
    assert store.rollup_lag() == (3 if lags else 0)
    assert blocked(db_url) == [("api.example.com", 3, "01", "09")]
    # A late-allow's batch adds what waits first, then supersedes as ever.
    store.write([event(5, "connection_late_allowed", 4, matched_rule="*.example.com")])
    assert store.rollup_lag() == 0
    assert blocked(db_url) == [("api.example.com", 1, "09", "09")]
    # Left out again: a block from before the late-allow (superseded on arrival) and one after.
    store.write([event(3, "connection_blocked", 5), event(12, "connection_blocked", 6)])
    assert store.rollup_lag() == (2 if lags else 0)
    views = {view: answers(db_url, view) for view in COMPARED}
    assert blocked(db_url) == [("api.example.com", 2, "09", "12")]
    with run_query(db_url, "SELECT SUM(counted), SUM(events) FROM destination_minutes_all "
                           "WHERE event_type = 'connection_blocked'") as (_, rows):
        assert list(map(tuple, rows)) == [(2, 5)]
    assert store.catch_up(1) == (1 if lags else 0)  # oldest first, as many as asked
    assert store.catch_up(10) == (1 if lags else 0)
    assert store.rollup_lag() == 0
    assert {view: answers(db_url, view) for view in COMPARED} == views
    store.close()


def test_rows_pruned_before_they_were_rolled_up_still_count_in_the_kept_rollups(db_url):
    store = AuditStore(db_url, defer_rollups=True)
    store.migrate()
    store.write([event(1, "connection_blocked", 1), event(2, "connection_blocked", 2)])
    assert store.prune("9999").rows == 2  # every row, before the rollups counted them
    assert blocked(db_url) == [("api.example.com", 2, "01", "02")]  # destinations kept
    assert [t["blocked"] for t in answers(db_url, "timeline_daily")] == [2]
    # With every row gone SQLite gives their ids again: the new rows still count once.
    store.write([event(3, "connection_blocked", 3)])
    assert blocked(db_url) == [("api.example.com", 3, "01", "03")]
    store.catch_up(10)
    assert blocked(db_url) == [("api.example.com", 3, "01", "03")]
    assert [t["blocked"] for t in answers(db_url, "timeline_daily")] == [3]
    store.close()
