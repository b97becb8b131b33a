"""Retention: `sluice prune --before` and SLUICE_RETENTION_DAYS in persist, on both databases.

Pruned rows leave audit_events and the per-minute timeline; the daily and all-time rollups
keep counting them.
"""

import time

from typer.testing import CliRunner

from pipeline import wire
from pipeline.audit.records import AuditEvent
from pipeline.cli.app import app
from pipeline.audit.query import run_query
from pipeline.audit.retention import Retention
from pipeline.stages.persist import PersistStage
from pipeline.audit.store import AuditStore
from tests.support.persistkit import jsonl_fields, make_settings
from tests.support.stagekit import StageThread
from tests.support.wait import wait_for

T = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
DAY = 86_400 * 1_000_000_000
runner = CliRunner()


def history(days=3, per_day=7):
    return [AuditEvent(T + d * DAY + i * 1_000_000_000, "connection_blocked", dst_ip="1.1.1.1",
                       dst_port=443, protocol="TCP", process="curl", would_deny=True,
                       event_id=f"d{d}-{i}", host="h")
            for d in range(days) for i in range(per_day)]


def answers(url, sql):
    with run_query(url, sql) as (_, rows):
        return [tuple(r) for r in rows]


def summaries(url):
    return (answers(url, "SELECT * FROM timeline_daily ORDER BY day"),
            answers(url, "SELECT * FROM blocked_destinations"),
            answers(url, "SELECT * FROM process_activity"))


def filled(url):
    store = AuditStore(url)
    store.migrate()
    store.write(history())
    store.close()
    return url


def test_prune_removes_rows_and_minutes_before_the_date_and_keeps_the_daily_past(db_url):
    url = filled(db_url)
    before = summaries(url)
    result = runner.invoke(app, ["prune", "--before", "2026-01-03", "--db", url])
    assert result.exit_code == 0, result.output
    assert result.output == ("pruned 14 audit row(s) and 2 timeline minute(s) older than "
                             "2026-01-03T00:00:00.000000000Z; the daily rollups keep counting "
                             "them\n")
    assert answers(url, "SELECT DISTINCT substr(timestamp, 1, 10) FROM audit_events") == [
        ("2026-01-03",)]
    assert answers(url, "SELECT minute FROM timeline") == [("2026-01-03T00:00Z",)]
    assert summaries(url) == before


def test_prune_works_in_batches_of_the_size_given(db_url):
    store = AuditStore(filled(db_url))
    first = store.prune_batch("2026-01-02T12:00:00.000000000Z", limit=5)
    assert (first.rows, first.done) == (5, False)
    assert store.prune("2026-01-02T12:00:00.000000000Z", limit=5) == (9, 2, True)
    store.close()


def test_a_bad_date_or_a_newer_store_is_one_line_and_changes_nothing(db_url):
    url = filled(db_url)
    result = runner.invoke(app, ["prune", "--before", "last tuesday", "--db", url])
    assert result.exit_code == 2
    assert result.stderr == ("sluice: --before 'last tuesday': use an RFC 3339 time or "
                             "a date\n")
    store = AuditStore(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO schema_migrations VALUES ('9999_future', 'x')")
    store.close()
    result = runner.invoke(app, ["prune", "--before", "2026-02-01", "--db", url])
    assert result.exit_code == 5
    assert "9999_future" in result.stderr and result.stderr.count("\n") == 1
    assert answers(url, "SELECT count(*) FROM audit_events") == [(21,)]


def test_retention_prunes_a_pass_in_steps_then_waits_an_hour(db_url):
    store = AuditStore(filled(db_url))
    now_ns = T + 2 * DAY + 12 * 3600 * 1_000_000_000  # keeps the last day and a half
    retention = Retention(1, clock=lambda: now_ns)
    steps = []
    while True:
        rows, summary = retention.step(store, now=100.0)
        steps.append(rows)
        if summary:
            break
    assert sum(steps) == 14 and summary.startswith("retention: pruned 14 audit row(s)")
    assert retention.step(store, now=101.0) == (0, None)  # the next pass is an hour away
    store.close()


def test_persist_prunes_old_rows_when_retention_is_set(tmp_path, pusher):
    settings = make_settings(tmp_path, SLUICE_RETENTION_DAYS="1")
    filled(settings.db)  # a store with three old days
    stage = StageThread(PersistStage(), settings).start()
    try:
        pusher(settings, wire.encode([AuditEvent(time.time_ns(), "connection_allowed",
                                                 event_id="now", host="h")]))
        wait_for(lambda: stage.counters().get("rows_pruned") == 21
                 and stage.counters().get("records_stored") == 1, "old rows pruned, new kept")
    finally:
        assert stage.finish() == 0
    assert answers(settings.db, "SELECT event_id FROM audit_events") == [("now",)]
    assert len(jsonl_fields(settings.audit_log)) == 1  # the log itself is logrotate's
    assert answers(settings.db, "SELECT day, events FROM timeline_daily ORDER BY day")[0] == (
        "2026-01-01", 7)
