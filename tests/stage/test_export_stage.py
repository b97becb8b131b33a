"""The export stage on a real store, against a local OTLP/HTTP receiver and syslog sockets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.audit.records import AuditEvent
from pipeline.export.store import COLUMNS
from pipeline.histogram import Histogram
from pipeline.stages.export import ExportStage
from pipeline.audit.store import as_row, audit_events
from tests.support.exportkit import (Store, SyslogListener, event, fast_retry, free_port,
                                     parse_syslog)
from tests.support.postgres import postgres_schema
from tests.support.stagekit import StageThread, stage_settings
from tests.support.tools.otlpreceiver import OtlpReceiver
from tests.support.wait import wait_for


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path}/audit.db")
    yield s
    s.close()


@pytest.fixture
def collector():
    with OtlpReceiver() as receiver:
        yield receiver


def export(tmp_path, **env) -> StageThread:
    return StageThread(ExportStage(delay=fast_retry), stage_settings(tmp_path, **env)).start()


def expected_attributes(e: AuditEvent) -> dict:
    """The record's fields by the JSONL line's omit-empty rule, timestamp aside."""
    out = {}
    for name in COLUMNS:
        if name in ("id", "timestamp"):
            continue
        value = getattr(e, name)
        if isinstance(value, bool) or value:
            out[name] = value
    return out


def delivered_ids(collector) -> list[str]:
    return [r["attributes"]["event_id"] for r in collector.records()]


def test_every_record_of_this_host_arrives_once_with_its_fields(tmp_path, store, collector):
    events = store.add(2500)
    store.add(40, host="another-host")  # a fleet's store: other hosts export their own
    stage = export(tmp_path, SLUICE_OTLP_ENDPOINT=collector.endpoint)
    wait_for(lambda: len(collector.records()) >= 2500, "the stored records at the collector")
    events += store.add(130)  # stored while the stage runs
    wait_for(lambda: len(collector.records()) >= 2630, "records stored later")
    assert stage.finish() == 0
    records = collector.records()
    by_id = {r["attributes"]["event_id"]: r for r in records}
    assert len(records) == len(by_id) == 2630
    for e in events:
        r = by_id[e.event_id]
        assert r["attributes"] == expected_attributes(e)
        assert r["body"] == e.event_type and r["event_name"] == f"sluice.{e.event_type}"
        assert r["time"] == e.timestamp
        assert r["severity"] == ("WARN" if e.blocked else "INFO")
    assert records[0]["resource"]["host.name"] == "test-host"
    assert records[0]["resource"]["service.name"] == "sluice"
    assert {path for _, path, _ in collector.requests} == {"/v1/logs"}
    counters = stage.counters()
    assert counters["otlp_exported"] == 2630 and counters.get("otlp_failures", 0) == 0


def test_an_outage_and_a_restart_in_the_middle_lose_nothing_and_repeat_nothing(
        tmp_path, store, collector):
    store.add(300)
    stage = export(tmp_path, SLUICE_OTLP_ENDPOINT=collector.endpoint)
    wait_for(lambda: len(collector.records()) == 300, "the first records")
    collector.down()
    store.add(1500)
    wait_for(lambda: stage.counters().get("otlp_failures", 0) >= 3, "attempts on a dead collector")
    wait_for(lambda: stage.counters().get("otlp_backlog") == 1500, "the backlog counted")
    assert stage.finish() == 0  # stopped while the collector is down
    stage = export(tmp_path, SLUICE_OTLP_ENDPOINT=collector.endpoint)
    store.add(200)
    wait_for(lambda: stage.counters().get("otlp_failures", 0) >= 2, "attempts after the restart")
    collector.up()
    wait_for(lambda: len(collector.records()) >= 2000, "everything once the collector is back")
    wait_for(lambda: stage.counters().get("otlp_backlog") == 0, "an empty backlog", timeout=15)
    assert stage.finish() == 0
    ids = delivered_ids(collector)
    assert len(ids) == len(set(ids)) == 2000


def test_5xx_is_retried_and_4xx_is_one_line_a_counter_and_skipped(tmp_path, store, collector,
                                                                  caplog):
    collector.answer = 503
    store.add(50)
    stage = export(tmp_path, SLUICE_OTLP_ENDPOINT=collector.endpoint)
    wait_for(lambda: stage.counters().get("otlp_failures", 0) >= 3, "retries of a 503")
    collector.answer = 200
    wait_for(lambda: len(collector.records()) == 50, "the records after the 503s")
    collector.answer = 400
    with caplog.at_level(logging.WARNING, logger="sluice.export"):
        for _ in range(3):
            store.add(10)
            wait_for(lambda: stage.counters().get("otlp_rejected", 0) >= store.next - 50,
                     "rejected records counted")
    collector.answer = 200
    store.add(5)
    wait_for(lambda: len(collector.records()) == 55, "records after the 400s")
    assert stage.finish() == 0
    counters = stage.counters()
    assert counters["otlp_rejected"] == 30 and counters["otlp_exported"] == 55
    refusals = [r for r in caplog.records if "HTTP 400" in r.getMessage()]
    assert len(refusals) == 1 and "not retried" in refusals[0].getMessage()


@pytest.mark.parametrize("env, counter, variable", [
    ({"SLUICE_OTLP_ENDPOINT": "collector:4318"}, "otlp_config_errors", "SLUICE_OTLP_ENDPOINT"),
    ({"SLUICE_OTLP_ENDPOINT": "http://127.0.0.1:9", "SLUICE_OTLP_HEADERS": "api-key"},
     "otlp_config_errors", "SLUICE_OTLP_HEADERS"),
    ({"SLUICE_SYSLOG": "syslog.example:514"}, "syslog_config_errors", "SLUICE_SYSLOG"),
    ({"SLUICE_METRICS_LISTEN": "9464"}, "metrics_config_errors", "SLUICE_METRICS_LISTEN"),
])
def test_a_bad_setting_is_one_line_and_a_counter_and_the_stage_goes_on(tmp_path, env, counter,
                                                                      variable, caplog):
    with caplog.at_level(logging.ERROR, logger="sluice.export"):
        stage = export(tmp_path, **env)
        wait_for(lambda: stage.counters().get(counter) == 1, f"{counter}")
        assert stage.thread.is_alive()
        assert stage.finish() == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and lines[0].startswith(variable)


# ---------------------------------------------------------------- syslog

@pytest.mark.parametrize("transport", ["unix", "udp", "tcp"])
def test_syslog_gets_one_rfc5424_message_per_blocked_late_allowed_or_refused_record(
        tmp_path, store, transport):
    listener = SyslogListener(transport, tmp_path)
    try:
        events = store.add(60)
        events += store.add(5, kind="connection_allowed", would_deny=True)  # audit mode
        stage = export(tmp_path, SLUICE_SYSLOG=listener.target)
        alerting = [e for e in events if e.blocked or e.would_deny or e.event_type in (
            "connection_late_allowed", "dns_blocked")]
        wait_for(lambda: len(listener.lines) >= len(alerting), "the syslog messages")
        assert stage.finish() == 0
    finally:
        listener.close()
    messages = [parse_syslog(line) for line in listener.lines]
    assert [m["params"]["event_id"] for m in messages] == [e.event_id for e in alerting]
    for m, e in zip(messages, alerting, strict=True):
        assert m["msgid"] == e.event_type and m["host"] == "test-host" and m["app"] == "sluice"
        facility, severity = divmod(int(m["pri"]), 8)
        assert facility == 13 and severity == (4 if e.blocked else 5)
        assert m["params"]["dst_ip"] == e.dst_ip
        if e.cname_chain:
            assert json.loads(m["params"]["cname_chain"]) == e.cname_chain
        assert m["time"].startswith("2026-01-01T00:00:00.") and m["time"].endswith("Z")
    assert stage.counters()["syslog_sent"] == len(alerting)


# ---------------------------------------------------------------- metrics





def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_show_each_stage_file_the_kernel_and_the_histograms(tmp_path, store, collector):
    settings = stage_settings(tmp_path)
    run = settings.run_dir
    run.mkdir(parents=True)
    latency = Histogram()
    for value in (0.0002, 0.003, 0.003, 7.0):
        latency.observe(value)
    (run / "dns.counters.json").write_text(json.dumps({
        "stage": "dns", "pid": os.getpid(), "counters": {"queries": 4, "refused": 1},
        "histograms": {"answer_latency_seconds": latency.snapshot()}}))
    (run / "persist.counters.json").write_text(json.dumps({
        "stage": "persist", "pid": os.getpid(), "counters": {"rows_inserted": 9,
                                                             "records_held": 2},
        "levels": ["records_held"]}))
    port = free_port()
    store.add(20)
    stage = export(tmp_path, SLUICE_METRICS_LISTEN=f"127.0.0.1:{port}",
                   SLUICE_OTLP_ENDPOINT=collector.endpoint)
    wait_for(lambda: stage.counters().get("otlp_exported") == 20, "the export")
    wait_for(lambda: stage.counters().get("otlp_backlog") == 0, "the backlog read")
    metrics = scrape(port)
    assert stage.finish() == 0
    assert metrics[("sluice_dns_queries_total", ())] == 4
    assert metrics[("sluice_persist_records_held", ())] == 2
    assert metrics[("sluice_persist_rows_inserted_total", ())] == 9
    assert metrics[("sluice_dns_answer_latency_seconds_count", ())] == 4
    assert metrics[("sluice_dns_answer_latency_seconds_bucket", (("le", "0.005"),))] == 3
    assert metrics[("sluice_dns_answer_latency_seconds_bucket", (("le", "+Inf"),))] == 4
    assert metrics[("sluice_export_otlp_exported_total", ())] == 20
    assert metrics[("sluice_export_otlp_backlog", ())] == 0
    assert metrics[("sluice_stage_up", (("stage", "export"),))] == 1
    assert metrics[("sluice_stage_up", (("stage", "capture"),))] == 0


# ---------------------------------------------------------------- PostgreSQL, and a crash


def test_postgresql_a_restart_beside_a_slow_writer_repeats_and_skips_nothing(
        tmp_path, postgres_url, collector):
    with postgres_schema(postgres_url) as url:
        store = Store(url)
        store.add(50)
        stage = export(tmp_path, SLUICE_OTLP_ENDPOINT=collector.endpoint, SLUICE_DB=url)
        wait_for(lambda: len(collector.records()) == 50, "the first rows")
        assert stage.finish() == 0
        slow = store.store.engine.connect()  # a writer that numbered a row, not committed
        transaction = slow.begin()
        late = event(9999)
        row = dict(zip(COLUMNS[1:], as_row(late), strict=True))
        slow.execute(audit_events.insert().values(row))
        stage = export(tmp_path, SLUICE_OTLP_ENDPOINT=collector.endpoint, SLUICE_DB=url)
        store.add(10)  # later ids, committed first
        wait_for(lambda: stage.counters().get("otlp_backlog") == 10, "the new rows counted")
        assert len(collector.records()) == 50  # nothing past the open writer's id, no repeats
        transaction.commit()
        slow.close()
        wait_for(lambda: len(collector.records()) == 61, "the rows once the writer committed")
        assert stage.finish() == 0
        store.close()
    ids = delivered_ids(collector)
    assert len(set(ids)) == len(ids) == 61 and late.event_id in ids


def test_a_crash_loses_nothing_and_repeats_at_most_the_unsaved_tail(tmp_path, store, collector):
    """kill -9 in the middle: at least once (the cursor is stored every second, or once it
    moved 4,096 ids; the batch in flight may have arrived too)."""
    events = store.add(6000)
    collector.delay = 0.05
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")},
           "SLUICE_RUN_DIR": str(run_dir), "SLUICE_DB": f"sqlite:///{tmp_path}/audit.db",
           "SLUICE_HOST": "test-host", "SLUICE_OTLP_ENDPOINT": collector.endpoint,
           "SLUICE_BPF_DIR": str(tmp_path / "no-bpffs"), "SLUICE_COUNTER_INTERVAL": "0.2"}
    sluice = [sys.executable, "-c", "from pipeline.cli.entry import main; main()", "run", "export"]
    first = subprocess.Popen(sluice, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(collector.records()) >= 2500, "part of the rows", timeout=30)
    finally:
        first.kill()
        first.wait(10)
    assert len(collector.records()) < 6000, "the crash came too late to test anything"
    second = subprocess.Popen(sluice, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: {e.event_id for e in events} <= set(delivered_ids(collector)),
                 "every row after the restart", timeout=30)
    finally:
        second.terminate()
        assert second.wait(10) == 0
    ids = delivered_ids(collector)
    assert set(ids) == {e.event_id for e in events}
    assert len(ids) - len(set(ids)) <= 4096 + 1024


def test_a_batch_unanswered_at_the_stop_is_given_up_in_time_and_sent_again(
        tmp_path, store, collector):
    events = store.add(10)
    collector.delay = 6.0  # longer than a stop may wait
    stage = export(tmp_path, SLUICE_OTLP_ENDPOINT=collector.endpoint)
    wait_for(lambda: collector.arrived == 1, "the request at the collector")
    assert stage.finish() == 0  # within StageThread's 10 s, not after the 6 s answer
    assert stage.counters()["abandoned_sends"] == 1
    collector.delay = 0.0
    stage = export(tmp_path, SLUICE_OTLP_ENDPOINT=collector.endpoint)
    wait_for(lambda: {e.event_id for e in events} <= set(delivered_ids(collector)),
             "the batch sent again", timeout=15)
    assert stage.finish() == 0
