"""The store on both backends: the same migrations, rows, duplicates and read-only rules on
SQLite and PostgreSQL (tests/unit/test_store.py covers what only SQLite files have: WAL, locks)."""

import json

import pytest
import sqlalchemy as sa

from pipeline.audit.records import AuditEvent, parse_timestamp
from pipeline.audit.query import QueryError, run_query
from pipeline.audit.store import (MIGRATIONS, VIEWS, AuditStore, StoreRejected, audit_events,
                            open_readonly)
from pipeline.events import DeliveredDestination

T0 = 1_767_225_600_123_456_789


def batch(n, first=0, host="h", **fields):
    return [AuditEvent(T0 + i, "connection_blocked", src_ip="10.0.0.2",
                       dst_ip=f"1.2.{i // 250}.{i % 250}", dst_port=443, protocol="TCP",
                       process="curl", pid=100 + i, event_id=f"{host}-{i:08d}", host=host, **fields)
            for i in range(first, first + n)]


@pytest.fixture
def store(db_url):
    s = AuditStore(db_url)
    s.migrate()
    yield s
    s.close()


def count(url, where="1=1"):
    with run_query(url, f"SELECT count(*) FROM audit_events WHERE {where}") as (_, rows):
        return next(rows)[0]


def test_every_migration_runs_once_and_every_view_answers(db_url):
    first = AuditStore(db_url)
    assert first.migrate() == [name for name, _ in MIGRATIONS]
    assert first.migrate() == []
    first.close()
    assert AuditStore(db_url).migrate() == []
    for view in VIEWS:
        with run_query(db_url, f"SELECT * FROM {view}") as (columns, rows):
            assert columns and list(rows) == []


def test_rows_read_back_equal_the_records(store, db_url):
    records = batch(3)
    records[1].cname_chain = ["a.example", "ü.example"]
    records[1].mid_stream = True
    records[2].pid = 0xFFFFFFFF
    records[2].would_deny, records[2].blocked = True, False
    records[2].cgroup = "/system.slice/docker-" + "c" * 64 + ".scope"
    records[2].container = "c" * 64
    store.write(records)
    engine = open_readonly(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(audit_events).order_by(audit_events.c.event_id)).mappings()
        got = [AuditEvent(**{**{k: v for k, v in r.items() if k != "id"},
                             "timestamp": parse_timestamp(r["timestamp"]),
                             "cname_chain": json.loads(r["cname_chain"] or "[]"),
                             "mid_stream": bool(r["mid_stream"]),
                             "would_deny": bool(r["would_deny"]), "blocked": bool(r["blocked"])})
               for r in rows]
    engine.dispose()
    assert got == records


def test_a_store_from_before_the_cgroup_columns_gains_them_and_its_views_show_them(db_url):
    CONTAINER = "d" * 64
    old = AuditStore(db_url)
    old.migrate(MIGRATIONS[:7])
    with old.engine.begin() as conn:  # a row as the old writer stored it
        conn.exec_driver_sql(
            "INSERT INTO audit_events (event_id, host, timestamp, event_type, src_ip, dst_ip, "
            "dst_hostname, dst_port, protocol, process, pid, matched_rule, auto_allowed_type, "
            "cname_chain, mid_stream, would_deny, blocked, packets) VALUES ('old-1', 'h', "
            "'2026-01-01T00:00:00.000000000Z', 'connection_blocked', '', '1.2.3.4', '', 443, "
            "'TCP', 'curl', 1, '', '', '', false, false, true, 1)")
    assert old.migrate() == ["0008_cgroup_container", "0009_rollup_lag"]
    old.write(batch(1, cgroup=f"/docker/{CONTAINER}", container=CONTAINER))
    old.close()
    with run_query(db_url, "SELECT event_id, cgroup, container, counted_block FROM "
                           "audit_events_counted ORDER BY event_id") as (_, rows):
        assert list(map(tuple, rows)) == [("h-00000000", f"/docker/{CONTAINER}", CONTAINER, 1),
                                          ("old-1", "", "", 1)]


def test_writes_are_idempotent_by_event_id(store, db_url):
    assert store.write(batch(5)) == 5
    assert store.write(batch(5)) == 0
    again = batch(3, first=4)  # one stored, two new
    assert [e.event_id for e in store.insert(again + again[1:2])] == ["h-00000005", "h-00000006"]
    assert count(db_url) == 7


def delivered(ip, delivered_ns, host="h"):
    return DeliveredDestination(host, f"{ip}:443", "", ip, 443, "TCP", T0, delivered_ns)


def test_a_delivered_destination_is_kept_as_first_stored(store, db_url):
    # A storm's summary brings thousands at once; a key delivered again (a crash between a
    # POST and its row) keeps its first row, within a chunk and across chunks.
    store.remember_delivered([delivered(f"1.2.{i // 250}.{i % 250}", T0 + 5) for i in range(5000)]
                             + [delivered("1.2.0.0", T0 + 9)])
    store.remember_delivered([delivered("1.2.0.1", T0 + 7), delivered("1.2.0.1", T0 + 8, "h2")])
    sql = ("SELECT host, destination, hostname, ip, port, protocol, first_seen, delivered_at "
           "FROM notified_destinations WHERE ip = '1.2.0.1' ORDER BY host")
    with run_query(db_url, sql) as (_, rows):
        assert list(rows) == [
            ("h", "1.2.0.1:443", "", "1.2.0.1", 443, "TCP", "2026-01-01T00:00:00.123456789Z",
             "2026-01-01T00:00:00.123456794Z"),
            ("h2", "1.2.0.1:443", "", "1.2.0.1", 443, "TCP", "2026-01-01T00:00:00.123456789Z",
             "2026-01-01T00:00:00.123456797Z")]
    with run_query(db_url, "SELECT count(*), max(delivered_at) FROM notified_destinations "
                           "WHERE host = 'h'") as (_, rows):
        assert next(rows) == (5000, "2026-01-01T00:00:00.123456794Z")


def test_hosts_share_one_store_and_batches_are_large(store, db_url):
    assert store.write(batch(20_000, host="runner-1")) == 20_000
    assert store.write(batch(300, host="runner-2")) == 300
    assert count(db_url, "host = 'runner-2'") == 300


def test_a_value_the_database_cannot_hold_is_rejected(store, db_url):
    too_big = batch(1, packets=1 << 64)
    with pytest.raises(StoreRejected):
        store.insert(too_big)
    assert count(db_url) == 0


@pytest.mark.parametrize("sql", [
    "DELETE FROM audit_events",
    "UPDATE audit_events SET process = 'x'",
    "DROP VIEW timeline",
    "SELECT 1; DELETE FROM audit_events",
    "CREATE TABLE t (x INTEGER)",
])
def test_query_refuses_every_write_and_changes_nothing(store, db_url, sql):
    store.write(batch(2))
    with pytest.raises(QueryError, match="read-only|one statement"):
        with run_query(db_url, sql):
            pass
    assert count(db_url) == 2


def test_the_read_only_connection_refuses_writes_the_statement_check_never_sees(store, db_url):
    store.write(batch(2))
    engine = open_readonly(db_url)
    sneaky = ("SELECT 1; COMMIT; DELETE FROM audit_events" if db_url.startswith("postgresql")
              else "DELETE FROM audit_events")
    with pytest.raises(sa.exc.SQLAlchemyError, match="read-only|readonly"):
        with engine.connect() as conn:
            conn.exec_driver_sql(sneaky)
            conn.commit()
    engine.dispose()
    assert count(db_url) == 2


def test_a_failing_query_is_one_line(store, db_url):
    with pytest.raises(QueryError, match="^query failed: .*no_such_table"):
        with run_query(db_url, "SELECT * FROM no_such_table"):
            pass


def test_a_plain_postgresql_url_uses_psycopg_3(postgres_url):
    engine = open_readonly(postgres_url)
    assert engine.dialect.driver == "psycopg"
    engine.dispose()
