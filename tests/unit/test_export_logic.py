"""The export's pure parts (settings, encodings, backoff, histograms) and its store reads."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import jsonschema

import pytest
import sqlalchemy as sa
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from pipeline.audit.records import AuditEvent
from pipeline.export.delivery import MAX_RETRY_S, retry_delay
from pipeline.export.store import BOOLEANS, COLUMNS, StoredRows
from pipeline.histogram import Histogram, cumulative
from pipeline.export.metrics import SluiceCollector, kernel_metrics
from pipeline.export.otlp import LogEncoder, parse_endpoint, parse_headers, stored_ns
from pipeline.audit.store import AuditStore, audit_events, as_row
from pipeline.export.syslog import format_message, parse_target, wanted
from tests.support.exportkit import event, parse_syslog
from tests.support.postgres import postgres_schema
from tests.support.tools.otlpreceiver import decode, value_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, url, origin, auth", [
    ("http://collector:4318", "http://collector:4318/v1/logs", "http://collector:4318", ""),
    ("https://otel.example/", "https://otel.example/v1/logs", "https://otel.example", ""),
    ("http://c:4318/tenant/a?key=x", "http://c:4318/tenant/a/v1/logs?key=x", "http://c:4318", ""),
    ("http://[::1]:4318", "http://[::1]:4318/v1/logs", "http://[::1]:4318", ""),
    ("https://ops:p%40ss@c:443", "https://c:443/v1/logs", "https://c:443",
     "Basic " + base64.b64encode(b"ops:p@ss").decode()),
])
def test_endpoint_is_a_base_url_with_v1_logs_appended(text, url, origin, auth):
    endpoint = parse_endpoint(text)
    assert (endpoint.url, endpoint.origin, endpoint.auth) == (url, origin, auth)


@pytest.mark.parametrize("text", ["s3cret:4318", "ftp://u:s3cret@c/x", "http://",
                                  "http://u:s3cret@c:99999", "http://[::1", "https://c/#s3cret",
                                  "  "])
def test_an_endpoint_that_is_not_a_url_is_refused_without_quoting_it(text):
    with pytest.raises(ValueError) as err:
        parse_endpoint(text)
    assert "s3cret" not in str(err.value)


def test_headers_parse_as_the_otlp_exporters_take_them():
    assert parse_headers("") == {}
    assert parse_headers("Authorization=Bearer%20s3cret, X-Tenant = ops,a=b=c") == {
        "Authorization": "Bearer s3cret", "X-Tenant": "ops", "a": "b=c"}


@pytest.mark.parametrize("text, entry", [("s3cret", "entry 1"), ("a=1,,b=2", "entry 2"),
                                        ("bad name=s3cret", "entry 1"), ("a=x%0Ay", "entry 1"),
                                        ("a=1,k=s3cret\u20ac", "entry 2")])
def test_headers_that_do_not_parse_name_the_entry_never_the_value(text, entry):
    with pytest.raises(ValueError) as err:
        parse_headers(text)
    assert entry in str(err.value) and "s3cret" not in str(err.value)


def test_stored_timestamps_become_nanoseconds():
    assert stored_ns("2026-01-01T00:00:00.000000001Z") == 1_767_225_600_000_000_001
    assert stored_ns("2026-01-01T00:00:01Z") == 1_767_225_601_000_000_000
    assert stored_ns("yesterday") == 0


def test_encoder_output_decodes_with_the_proto_package_and_reuses_nothing_wrongly():
    encoder = LogEncoder(COLUMNS, BOOLEANS, "h1")
    events = [event(i, host="h1") for i in range(30)]
    rows = [(i + 1, *as_row(e)) for i, e in enumerate(events)]
    body = encoder.encode(rows, 7)
    records = decode(gzip.compress(body), {"Content-Encoding": "gzip"})
    assert len(records) == 30
    for record, e in zip(records, events, strict=True):
        assert record["attributes"]["event_id"] == e.event_id
        assert record["attributes"]["dst_ip"] == e.dst_ip
        assert record["attributes"].get("cname_chain", []) == e.cname_chain
        assert record["attributes"]["blocked"] is e.blocked
        assert "timestamp" not in record["attributes"] and "id" not in record["attributes"]
        assert record["time"] == e.timestamp


def test_retry_delays_double_to_a_cap_or_follow_retry_after():
    assert [retry_delay(n, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6, 9)] == [
        1, 2, 4, 8, 16, 30, 30]
    assert retry_delay(3, rand=lambda: 0.0) == 2
    assert retry_delay(1, 12.0) == 12.0 and retry_delay(1, 10_000) == 300
    assert max(retry_delay(n) for n in range(1, 30)) <= MAX_RETRY_S


def test_histogram_buckets_are_cumulative_for_prometheus():
    h = Histogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.002, 5):
        h.observe(value)
    snap = h.snapshot()
    assert snap["counts"] == [2, 1, 1] and snap["count"] == 4
    assert cumulative(snap) == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    with pytest.raises(ValueError):
        Histogram((0.1, 0.01))


def test_kernel_counters_are_per_cpu_and_the_ring_buffer_loss_summed():
    registry = CollectorRegistry()
    registry.register(type("K", (), {"collect": lambda self: kernel_metrics(
        {"packets": [5, 7], "ringbuf_full": [1, 2]})})())
    text = generate_latest(registry).decode()
    assert 'sluice_kernel_packets_total{cpu="1"} 7.0' in text
    assert "sluice_ringbuf_lost_total 3.0" in text


def test_a_run_dir_with_nothing_running_scrapes_cleanly(tmp_path):
    registry = CollectorRegistry()
    registry.register(SluiceCollector(tmp_path, tmp_path / "no-bpffs", ("capture", "export")))
    text = generate_latest(registry).decode()
    assert 'sluice_stage_up{stage="capture"} 0.0' in text


@pytest.mark.parametrize("text, transport, address", [
    ("unix:///dev/log", "unix", "/dev/log"), ("udp://10.0.0.5:514", "udp", ("10.0.0.5", 514)),
    ("tcp://[2001:db8::1]:601", "tcp", ("2001:db8::1", 601)),
    ("tcp://logs.example:6514/", "tcp", ("logs.example", 6514))])
def test_syslog_targets(text, transport, address):
    target = parse_target(text)
    assert (target.transport, target.address) == (transport, address)


@pytest.mark.parametrize("text", ["/dev/log", "unix://dev/log", "udp://host", "tcp://:514",
                                  "http://h:514", "udp://h:0"])
def test_bad_syslog_targets(text):
    with pytest.raises(ValueError):
        parse_target(text)


def test_syslog_messages_escape_what_rfc5424_asks_and_keep_utf8_text():
    fields = dict(zip(COLUMNS, (9, *as_row(AuditEvent(
        1_767_225_600_123_456_789, "connection_blocked", dst_ip="203.0.113.9", dst_port=443,
        protocol="TCP", process='we"ird]\\päth\n', blocked=True, event_id="e1", host="h 1"))),
        strict=True))
    assert wanted(fields)
    message = parse_syslog(format_message(fields, 42).decode("utf-8"))
    assert message["params"]["process"] == 'we"ird]\\päth '
    assert message["host"] == "h1" and message["time"] == "2026-01-01T00:00:00.123456Z"
    assert message["msg"].startswith("\ufeffblocked we")
    allowed = dict(fields, event_type="connection_allowed", blocked=False)
    assert not wanted(allowed)


# ---------------------------------------------------------------- the store side


def test_postgresql_rows_committed_out_of_id_order_wait_for_the_slow_writer(postgres_url):
    with postgres_schema(postgres_url) as url:
        store = AuditStore(url)
        store.migrate()
        rows = StoredRows(url, "h1")
        assert rows.ready()
        first, second = event(1, "h1"), event(2, "h1")
        slow = store.engine.connect()
        tx = slow.begin()
        row = dict(zip(COLUMNS[1:], as_row(first), strict=True))
        slow.execute(audit_events.insert().values(row))
        store.write([second])  # a later id, committed first
        for _ in range(3):
            assert rows.rows(0, rows.settled(), 10) == []
        tx.commit()
        slow.close()
        rows.settled()
        got = [r[COLUMNS.index("event_id")] for r in rows.rows(0, rows.settled(), 10)]
        assert got == [first.event_id, second.event_id]  # in id order
        rows.save({"otlp": 2})
        assert rows.cursor("otlp") == 2 and rows.cursor("syslog") == 0
        rows.close()
        store.close()


def test_sqlite_reads_never_take_the_writer_lock(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.db"
    store = AuditStore(url)
    store.migrate()
    store.write([event(1, "h1")])
    rows = StoredRows(url, "h1")
    assert rows.ready()
    with store.engine.connect() as writer:  # BEGIN IMMEDIATE: the write lock is held
        writer.execute(sa.text("SELECT 1"))
        assert rows.settled() == 1 and len(rows.rows(0, 1, 10)) == 1
        assert rows.backlog(0) == 1
    rows.close()
    store.close()


def test_exported_records_follow_the_documented_schema():
    schema = json.loads((ROOT / "schemas" / "otlp_log_record.json").read_text())
    attributes = schema["properties"]["attributes"]["properties"]
    assert set(COLUMNS) - {"id", "timestamp"} <= set(attributes), "document each new field"
    encoder = LogEncoder(COLUMNS, BOOLEANS, "h1")
    rows = [(i + 1, *as_row(event(i, host="h1"))) for i in range(40)]
    request = ExportLogsServiceRequest.FromString(encoder.encode(rows, 7))
    [resource_logs] = request.resource_logs
    jsonschema.validate({kv.key: value_of(kv.value) for kv in resource_logs.resource.attributes},
                        schema["$defs"]["resource"])
    [scope_logs] = resource_logs.scope_logs
    assert (scope_logs.scope.name, len(scope_logs.log_records)) == ("sluice", 40)
    for record in scope_logs.log_records:
        jsonschema.validate({
            "time_unix_nano": record.time_unix_nano,
            "observed_time_unix_nano": record.observed_time_unix_nano,
            "severity_number": record.severity_number, "severity_text": record.severity_text,
            "body": value_of(record.body), "event_name": record.event_name,
            "attributes": {kv.key: value_of(kv.value) for kv in record.attributes}}, schema)
