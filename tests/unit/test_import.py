"""`sluice import` of a cargowall-format NDJSON log: offsets, fractions, omitted fields, bad lines,
and a second import that adds nothing."""

from pathlib import Path

from pipeline.audit.importer import import_file
from pipeline.audit.query import run_query

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cargowall-audit.ndjson"


def rows(url):
    with run_query(url, "SELECT timestamp, event_type, src_ip, dst_ip, dst_hostname, dst_port, "
                        "protocol, process, pid, matched_rule, cname_chain, packets, host, "
                        "event_id, cgroup, container FROM audit_events "
                        "ORDER BY timestamp, event_id") as (cols, rs):
        return [dict(zip(cols, r, strict=True)) for r in rs]


def test_a_cargowall_log_is_stored_line_by_line_with_reasons_for_the_rest(db_url):
    report = import_file(FIXTURE, db_url, "imported-host")
    assert (report.lines, report.stored) == (15, 8)
    assert dict(report.skipped) == {
        "blank line": 1, "dst_port is not a whole number": 1, "timestamp is not RFC 3339": 1,
        "no timestamp": 1, "field dst_port is outside 0-65535": 1, "not JSON": 1,
        "not a JSON object": 1,
        "already stored": 0}
    assert report.first_line["not JSON"] == 13
    got = rows(db_url)
    assert [r["timestamp"] for r in got] == [
        "2025-06-01T10:00:00.123456789Z",  # +02:00
        "2025-06-01T10:00:01.000000000Z",
        "2025-06-01T10:00:02.500000000Z",  # -05:00, one fractional digit
        "2025-06-01T10:00:03.100000000Z",
        "2025-06-01T10:00:04.000001000Z",
        "2025-06-01T10:00:05.000000000Z",
        "2025-06-01T10:00:05.000000000Z",  # the same line twice: two records
        "2025-06-01T10:00:09.123000000Z",
    ]
    dns = next(r for r in got if r["event_type"] == "dns_blocked")
    assert (dns["dst_hostname"], dns["dst_ip"], dns["dst_port"], dns["pid"], dns["packets"]) == (
        "exfil.example<x>.test", "", 0, 0, 1)
    late = next(r for r in got if r["event_type"] == "connection_late_allowed")
    assert late["cname_chain"] == '["pypi.org","dualstack.python.map.fastly.net"]'
    assert (late["container"], late["cgroup"]) == ("abc123", "")  # cargowall's container_id
    assert {r["host"] for r in got} == {"imported-host", "runner-7"}
    own = next(r for r in got if r["host"] == "runner-7")
    assert own["event_id"] == "sluice-0001"


def test_importing_the_same_log_twice_adds_nothing(db_url, tmp_path):
    first = import_file(FIXTURE, db_url, "h")
    copy = tmp_path / "copy.ndjson"
    copy.write_bytes(FIXTURE.read_bytes())
    again = import_file(copy, db_url, "h")
    assert first.stored == 8
    assert (again.stored, again.skipped["already stored"]) == (0, 8)
    assert len(rows(db_url)) == 8
    assert again.lines_out()[0] == "read 15 line(s): stored 0, skipped 15"


def test_the_command_reports_lines_stored_and_reasons(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli.app import app

    url = f"sqlite:///{tmp_path}/audit.db"
    result = CliRunner().invoke(app, ["import", str(FIXTURE), "--db", url, "--host", "ci-1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "read 15 line(s): stored 8, skipped 7"
    assert "  skipped 1: not JSON (first at line 13)" in lines
    # Each rejected line on stderr, by number (the blank line is not a rejection).
    rejected = result.stderr.splitlines()
    assert [line.split(":")[1] for line in rejected] == ["9", "10", "11", "12", "13", "14"]
    assert rejected[4].startswith(f"{FIXTURE}:13: not JSON (column ")
    assert {r["host"] for r in rows(url)} == {"ci-1", "runner-7"}
    missing = CliRunner().invoke(app, ["import", str(tmp_path / "none.ndjson"), "--db", url])
    assert missing.exit_code == 5 and "cannot read" in missing.output
