"""`sluice query` through the CLI: the four formats, the default database, refused writes."""

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from pipeline.audit import AuditEvent
from pipeline.cli import app
from pipeline.store import AuditStore

runner = CliRunner()
T = 1_767_225_600_000_000_000
SQL = "SELECT process, dst_port, blocked FROM audit_events ORDER BY dst_port"


@pytest.fixture
def url(db_url):
    store = AuditStore(db_url)
    store.migrate()
    store.write([AuditEvent(T + i, "connection_blocked", dst_ip="1.1.1.1", dst_port=port,
                            protocol="TCP", process=name, blocked=True, event_id=f"q-{i}",
                            host="h")
                 for i, (name, port) in enumerate([("curl", 443), ("wget, the <old> one", 80)])])
    store.close()
    return db_url


def query(*args):
    return runner.invoke(app, ["query", *args])


def test_table_is_aligned_with_a_row_count(url):
    result = query(SQL, "--db", url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["process", "dst_port", "blocked"]
    assert lines[2].startswith("wget, the <old> one  80")
    assert lines[-1] == "(2 rows)"


def test_csv_json_and_ndjson_carry_the_same_rows(url):
    rows = list(csv.DictReader(io.StringIO(query(SQL, "--db", url, "-f", "csv").output)))
    assert [(r["process"], r["dst_port"]) for r in rows] == [("wget, the <old> one", "80"),
                                                             ("curl", "443")]
    as_json = json.loads(query(SQL, "--db", url, "--format", "json").output)
    as_ndjson = [json.loads(line) for line in
                 query(SQL, "--db", url, "--format", "ndjson").output.splitlines()]
    assert as_json == as_ndjson
    assert [(r["process"], r["dst_port"], bool(r["blocked"])) for r in as_json] == [
        ("wget, the <old> one", 80, True), ("curl", 443, True)]


def test_the_database_defaults_to_the_setting(url, monkeypatch):
    monkeypatch.setenv("SLUICE_DB", url)
    assert "(2 rows)" in query("SELECT * FROM blocked_destinations").output


def test_a_write_is_refused_in_one_line_and_changes_nothing(url):
    result = query("DELETE FROM audit_events", "--db", url)
    assert result.exit_code == 5
    assert result.output.strip().splitlines() == [
        "sluice: refused DELETE: sluice query is read-only and runs only SELECT (WITH ... "
        "SELECT, VALUES) statements; nothing was changed"]
    assert "(2 rows)" in query(SQL, "--db", url).output


@pytest.mark.parametrize("args, message", [
    (["SELECT 1", "--format", "xml"], "--format 'xml': use table, csv, json, ndjson"),
    (["SELECT * FROM nowhere"], "query failed:"),
])
def test_mistakes_are_one_line(url, args, message):
    result = query(*args, "--db", url)
    assert result.exit_code == 5 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
