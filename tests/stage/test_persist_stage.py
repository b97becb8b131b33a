"""The persist stage on real ZeroMQ sockets, a real SQLite file and a real JSONL file."""

import json
import sqlite3

import msgpack
import msgspec
import sqlalchemy as sa

from pipeline import wire
from pipeline.audit.records import AuditEvent, parse_timestamp
from pipeline.stages.persist import JSONL_MARK, PersistStage
from pipeline.audit.query import run_query
from pipeline.audit.store import AuditStore, audit_events, open_readonly
from tests.support.persistkit import jsonl_fields, make_settings
from tests.support.stagekit import StageThread
from tests.support.wait import wait_for

T0 = 1_767_225_600_123_456_789  # 2026-01-01T00:00:00.123456789Z


def record(n, **fields):
    base = dict(timestamp=T0 + n, event_type="connection_blocked", src_ip="10.0.0.2",
                dst_ip=f"93.184.216.{n % 250}", dst_hostname="example.com", dst_port=443,
                protocol="TCP", process="curl", pid=4000 + n, would_deny=True,
                event_id=f"id-{n:06d}")
    base.update(fields)
    return AuditEvent(**base)


def sql_fields(settings):
    engine = open_readonly(settings.db)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(audit_events).order_by(audit_events.c.id)).mappings()
            out = []
            for row in rows:
                data = {k: v for k, v in row.items() if k != "id"}
                data["timestamp"] = parse_timestamp(data["timestamp"])
                data["cname_chain"] = json.loads(data["cname_chain"] or "[]")
                out.append(data)
            return out
    finally:
        engine.dispose()


def expected_fields(records):
    """What persist stores for records sent without a host: this host's name."""
    return [{**{k: v for k, v in msgspec.structs.asdict(r).items() if k != "seq"},
             "host": r.host or "test-host"} for r in records]


def test_records_become_agreeing_jsonl_lines_and_sql_rows(tmp_path, pusher):
    settings = make_settings(tmp_path)
    sent = [record(n) for n in range(300)]
    sent[1] = record(1, event_type="connection_allowed", would_deny=False,
                     auto_allowed_type="dns", protocol="UDP", dst_port=53)
    sent[2] = record(2, event_type="dns_blocked", src_ip="", dst_ip="", dst_port=0,
                     protocol="", process="", pid=0, dst_hostname="evil.example")
    sent[3] = record(3, cname_chain=["a.example", "b.cdn.example"], mid_stream=True, packets=9)
    sent[4] = record(4, dst_hostname="<b>&co\u2028", host="other-host")
    stage = StageThread(PersistStage(), settings).start()
    try:
        for start in range(0, len(sent), 64):
            pusher(settings, wire.encode(sent[start:start + 64]))
        wait_for(lambda: len(jsonl_fields(settings.audit_log)) == len(sent), "300 JSONL lines")
    finally:
        assert stage.finish() == 0

    expected = expected_fields(sent)
    assert jsonl_fields(settings.audit_log) == expected
    assert sql_fields(settings) == expected
    counters = stage.counters()
    assert counters["rows_inserted"] == counters["records_stored"] == len(sent)
    assert counters.get("records_dropped", 0) == 0


def test_missing_id_host_and_time_are_filled_the_same_in_both(tmp_path, pusher):
    settings = make_settings(tmp_path)
    stage = StageThread(PersistStage(), settings).start()
    try:
        pusher(settings, wire.encode([record(0, event_id="", host="", timestamp=0)]))
        wait_for(lambda: jsonl_fields(settings.audit_log), "a JSONL line")
    finally:
        stage.finish()
    [line] = jsonl_fields(settings.audit_log)
    assert line["event_id"] and line["host"] == "test-host" and line["timestamp"] > T0
    assert sql_fields(settings) == [line]


def test_garbage_and_bad_records_are_counted_and_the_stage_keeps_working(tmp_path, pusher):
    settings = make_settings(tmp_path)
    good = record(1)
    bad_types = msgpack.packb({"kind": "audit_records", "v": 3,
                               "records": [[1, 2, 3], record(2).to_wire()]})
    out_of_range = wire.encode([record(3, dst_port=70_000)])
    stage = StageThread(PersistStage(), settings).start()
    try:
        pusher(settings, b"\xc1 not msgpack", bad_types, out_of_range,
               wire.encode([record(4)], kind="audit_records")[:5])
        pusher(settings, wire.encode([good]))
        wait_for(lambda: len(jsonl_fields(settings.audit_log)) == 2, "the two good records")
    finally:
        assert stage.finish() == 0
    assert [f["event_id"] for f in jsonl_fields(settings.audit_log)] == ["id-000002", "id-000001"]
    assert len(sql_fields(settings)) == 2
    counters = stage.counters()
    assert counters["malformed_messages"] == 2
    assert counters["malformed_records"] == 2  # a short array, and a port out of range
    assert "records_rejected" not in counters  # nothing reached the database's own checks


def test_stop_stores_everything_pushed_before_it(tmp_path, pusher):
    # Nothing is due by count or time while running: only the stop path stores.
    settings = make_settings(tmp_path, SLUICE_FLUSH_INTERVAL="3600", SLUICE_BATCH_MAX="100000")
    sent = [record(n) for n in range(1000)]
    stage = StageThread(PersistStage(), settings).start()
    pusher(settings, *(wire.encode(sent[i:i + 100]) for i in range(0, 1000, 100)))
    assert stage.finish() == 0
    assert len(jsonl_fields(settings.audit_log)) == 1000
    assert sql_fields(settings) == expected_fields(sent)


def rollup_lag(settings):
    conn = sqlite3.connect(f"file:{settings.db.removeprefix('sqlite:///')}?mode=ro", uri=True)
    try:
        return (conn.execute("SELECT COALESCE(MAX(id), 0) FROM audit_events").fetchone()[0]
                - conn.execute("SELECT last_id FROM rollup_progress").fetchone()[0])
    finally:
        conn.close()


def test_rows_stored_apart_from_the_rollups_are_added_once_records_stop(tmp_path, pusher):
    settings = make_settings(tmp_path)
    sent = [record(n) for n in range(3000)]
    stage = StageThread(PersistStage(), settings).start()
    try:
        pusher(settings, *(wire.encode(sent[i:i + 100]) for i in range(0, len(sent), 100)))
        wait_for(lambda: len(jsonl_fields(settings.audit_log)) == len(sent), "3000 lines")
        wait_for(lambda: rollup_lag(settings) == 0, "the rollups to count every row")
    finally:
        assert stage.finish() == 0
    counters = stage.counters()
    assert counters["rows_rolled_up"] == counters["rows_inserted"] == len(sent)
    with run_query(settings.db, "SELECT SUM(attempts) FROM blocked_destinations") as (_, rows):
        assert list(map(tuple, rows)) == [(len(sent),)]


def test_a_restarted_stage_appends_and_skips_what_is_stored(tmp_path, pusher):
    settings = make_settings(tmp_path)
    first, second = [record(n) for n in range(10)], [record(n) for n in range(10, 20)]
    for batch in (first, first[5:] + second):  # the second run also gets five old ids
        stage = StageThread(PersistStage(), settings).start()
        try:
            pusher(settings, wire.encode(batch))
            wait_for(lambda stage=stage, batch=batch: stage.counters().get("records_stored", 0)
                     + stage.counters().get("duplicates_skipped", 0) >= len(batch),
                     "the batch to be handled")
        finally:
            stage.finish()
    assert stage.counters()["duplicates_skipped"] == 5
    assert jsonl_fields(settings.audit_log) == expected_fields(first + second)
    assert sql_fields(settings) == expected_fields(first + second)


def committed_without_lines(settings, records):
    """What a persist killed between its SQL commit and its JSONL write leaves behind."""
    store = AuditStore(settings.db)
    try:
        assert store.insert(records) == records
    finally:
        store.close()


def store_ten_then_five_more(settings, pusher):
    """A first run stores ten records; returns them and five more for a crash to keep."""
    stored = [record(n, host="test-host") for n in range(10)]
    stage = StageThread(PersistStage(), settings).start()
    try:
        pusher(settings, wire.encode(stored))
        wait_for(lambda: len(jsonl_fields(settings.audit_log)) == 10, "the first lines")
    finally:
        stage.finish()
    return stored, [record(n, host="test-host") for n in range(10, 15)]


def restart_until_lines(settings, count):
    """persist started again, until its file has count lines; the finished stage."""
    stage = StageThread(PersistStage(), settings).start()
    try:
        wait_for(lambda: len(jsonl_fields(settings.audit_log)) == count, "the caught-up lines")
    finally:
        stage.finish()
    return stage


def test_rows_a_crash_kept_from_the_file_are_appended_to_it(tmp_path, pusher):
    settings = make_settings(tmp_path)
    stored, crashed = store_ten_then_five_more(settings, pusher)
    committed_without_lines(settings, crashed)
    stage = restart_until_lines(settings, 15)
    assert stage.counters()["jsonl_caught_up"] == 5
    assert jsonl_fields(settings.audit_log) == sql_fields(settings) == expected_fields(
        stored + crashed)


def test_a_new_empty_file_gets_only_the_rows_a_crash_kept_from_it(tmp_path, pusher):
    """logrotate moved the file away; persist then committed rows and was killed before it
    wrote their first line: the new file has no line to go by, persist's mark has."""
    settings = make_settings(tmp_path)
    stored, crashed = store_ten_then_five_more(settings, pusher)
    rotated = settings.audit_log.rename(tmp_path / "audit.jsonl.1")
    stage = StageThread(PersistStage(), settings).start()  # a restart with nothing missing
    stage.finish()
    assert jsonl_fields(settings.audit_log) == []
    committed_without_lines(settings, crashed)
    stage = restart_until_lines(settings, 5)
    assert jsonl_fields(settings.audit_log) == expected_fields(crashed)
    assert jsonl_fields(rotated) == expected_fields(stored)


def test_rows_a_crash_kept_from_the_first_line_ever_are_appended(tmp_path, pusher):
    """Killed between the first SQL commit and the first JSONL line: no line and no
    last-written mark to go by, yet the file gets every row."""
    settings = make_settings(tmp_path)
    StageThread(PersistStage(), settings).start().finish()  # a first start, nothing stored
    crashed = [record(n, host="test-host") for n in range(5)]
    committed_without_lines(settings, crashed)
    stage = restart_until_lines(settings, 5)
    assert stage.counters()["jsonl_caught_up"] == 5
    assert jsonl_fields(settings.audit_log) == expected_fields(crashed)


def test_a_store_without_a_mark_keeps_its_history_out_of_an_empty_file(tmp_path, pusher):
    """A store from before the mark, and an empty file: its rows are not appended again,
    but a crash in this run before its first line still is."""
    settings = make_settings(tmp_path)
    StageThread(PersistStage(), settings).start().finish()  # the schema
    (settings.journal_dir / JSONL_MARK).unlink()  # ... as a persist from before the mark
    committed_without_lines(settings, [record(n, host="test-host") for n in range(10)])
    stage = StageThread(PersistStage(), settings).start()
    stage.finish()
    assert jsonl_fields(settings.audit_log) == []
    assert stage.counters().get("jsonl_caught_up", 0) == 0
    crashed = [record(n, host="test-host") for n in range(10, 15)]
    committed_without_lines(settings, crashed)
    stage = restart_until_lines(settings, 5)
    assert jsonl_fields(settings.audit_log) == expected_fields(crashed)


def test_a_locked_database_delays_records_but_loses_none(tmp_path, pusher):
    settings = make_settings(tmp_path)
    stage = StageThread(PersistStage(), settings).start()
    locker = sqlite3.connect(settings.db.removeprefix("sqlite:///"), isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # holds the write lock the stage needs
        pusher(settings, wire.encode([record(n) for n in range(50)]))
        wait_for(lambda: stage.counters().get("store_errors", 0) >= 1, "a failed SQL write")
        assert not settings.audit_log.exists() or jsonl_fields(settings.audit_log) == []
        locker.execute("ROLLBACK")
        wait_for(lambda: len(jsonl_fields(settings.audit_log)) == 50, "the delayed records")
    finally:
        locker.close()
        stage.finish()
    assert sql_fields(settings) == expected_fields([record(n) for n in range(50)])


def test_a_failing_jsonl_file_is_counted_and_keeps_sql_ahead_of_it(tmp_path, pusher):
    settings = make_settings(tmp_path, SLUICE_AUDIT_LOG="/dev/full")  # every write: ENOSPC
    stage = StageThread(PersistStage(), settings).start()
    try:
        pusher(settings, wire.encode([record(n) for n in range(5)]))
        wait_for(lambda: stage.counters().get("jsonl_errors", 0) >= 2, "retried JSONL writes")
    finally:
        stage.finish()
    assert len(sql_fields(settings)) == 5
    counters = stage.counters()
    assert counters["rows_inserted"] == 5 and counters.get("records_stored", 0) == 0
    assert counters["records_unstored_at_stop"] == 5  # the lines the file never took


def test_an_unusable_database_stops_the_stage_at_start_with_one_line(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    settings = make_settings(tmp_path, SLUICE_DB=f"sqlite:///{blocker}/audit.db")
    stage = StageThread(PersistStage(), settings)
    stage.thread.start()
    stage.thread.join(timeout=10)
    assert stage.exit_code == 5
    failed = (settings.run_dir / "persist.failed").read_text()
    assert failed.count("\n") == 1 and str(blocker) in failed
