"""`sluice replay` through the CLI: offline what-if with its summary, and its one-line errors."""

import logging

import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.events import DnsMapping, RawEvent
from pipeline.loop import Counters
from pipeline.audit.query import run_query
from pipeline.recording import Header, Recorder, RecordingWriter

runner = CliRunner()
T0 = 1_767_225_600_000_000_000


@pytest.fixture
def recording(tmp_path):
    path = tmp_path / "rec"
    clock = iter(range(T0, T0 + 10**9, 1000))
    rec = Recorder(RecordingWriter(path, 1 << 20, Header("rec-host", "audit", T0)), Counters(),
                   logging.getLogger("t"), clock=lambda: next(clock))
    rec.add("dns_mappings", [DnsMapping("api.example.com", ["93.184.216.34"], 60, [], T0)])
    rec.add("raw_events", [RawEvent(4, False, 6, 0, "10.0.0.2", "93.184.216.34", 40000 + n, 443,
                                    T0 + n, 77, "curl", 1, "", 0, "") for n in range(50)])
    rec.close()
    return path


def test_offline_replay_stores_what_the_policy_would_produce(tmp_path, recording, monkeypatch):
    monkeypatch.setenv("SLUICE_DNS_UPSTREAM", "127.0.0.53")
    policy = tmp_path / "policy.json"
    policy.write_text('{"defaultAction": "deny", "rules": [{"type": "hostname", "value": '
                      '"api.example.com", "action": "allow", "ports": [{"port": 443, '
                      '"protocol": "tcp"}]}]}')
    url = f"sqlite:///{tmp_path}/what-if.db"
    result = runner.invoke(app, ["replay", str(recording), "--offline", "--policy", str(policy),
                                 "--db", url])
    assert result.exit_code == 0, result.output
    assert "replayed 50 event(s) and 1 DNS mapping(s) from 1 file(s)" in result.output
    assert "outcomes: connection_allowed 50" in result.output
    with run_query(url, "SELECT DISTINCT event_type, dst_hostname, host, would_deny "
                        "FROM audit_events") as (_, rows):
        assert [tuple(r) for r in rows] == [("connection_allowed", "api.example.com",
                                             "rec-host", 0)]


@pytest.mark.parametrize("args, message", [
    (["--offline"], "--offline needs --policy FILE and --db URL"),
    (["--pace", "fast"], "--pace 'fast'"),
    (["--offline", "--policy", "p.json", "--db", "sqlite://", "--mode", "strict"], "--mode"),
])
def test_mistakes_are_one_line(recording, args, message):
    result = runner.invoke(app, ["replay", str(recording), *args])
    assert result.exit_code != 0 and message in result.output


def test_a_file_that_is_not_a_recording_is_one_line(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    result = runner.invoke(app, ["replay", str(other), "--pace", "max"])
    assert result.exit_code == 5 and "not a sluice recording" in result.output
