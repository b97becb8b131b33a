"""`sluice query` through the CLI: the four formats, the default database, refused writes."""

import csv
import io
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.audit.records import AuditEvent
from pipeline.cli.app import app
from pipeline.audit.store import AuditStore

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


def test_since_and_until_are_bound_as_fixed_width_times(url):
    sql = ("SELECT process FROM audit_events WHERE timestamp >= :since AND timestamp < :until "
           "ORDER BY process")
    result = query(sql, "--db", url, "--since", "2026-01-01", "--until",
                   "2026-01-01T00:00:00.000000001Z", "-f", "csv")
    assert result.output.splitlines() == ["process", "curl"]
    assert query(sql.replace(":until", "'2027'"), "--db", url, "--since", "1h",
                 "-f", "csv").output.splitlines() == ["process"]


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_time_that_is_not_one_is_one_line_and_exit_2(url, option):
    result = query("SELECT 1", "--db", url, option, "yesterday-ish")
    assert result.exit_code == 2
    assert result.stderr == (f"sluice: {option} 'yesterday-ish': use an RFC 3339 time or an "
                             "age such as 24h or 7d, or a date\n")


def sluice_process(*args):
    """The `sluice` entry point in a fresh interpreter, as a user's shell runs it."""
    return subprocess.run([sys.executable, "-c", "from pipeline.cli.entry import main; main()",
                           "query", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [
    [SQL, "-f", "json"], ["SELECT * FROM timeline", "--format=csv"],
    ["DELETE FROM audit_events"], ["SELECT :since AS s", "--since", "2026-01-01"],
])
def test_the_quick_path_answers_as_the_full_command_line(url, args):
    quick = sluice_process(*args, "--db", url)
    full = query(*args, "--db", url)
    assert (quick.returncode, quick.stdout, quick.stderr) == (
        full.exit_code, full.stdout, full.stderr)


def test_the_quick_path_loads_neither_typer_nor_sqlalchemy(url):
    probe = ("import sys; from pipeline.cli.entry import quick_query; "
             "code = quick_query(sys.argv[2:]); "
             "print(code, 'typer' in sys.modules, 'sqlalchemy' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, "query", "SELECT 1 AS one", "--db",
                             url], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("one")
    assert result.stderr == "0 False False\n"
