"""`sluice browse`: the real Datasette, started as a user starts it, read over HTTP."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from pipeline.audit.records import AuditEvent
from pipeline.audit.browse import DESCRIPTIONS, QUERIES
from pipeline.cli.app import app
from pipeline.audit.query import run_query
from pipeline.audit.store import VIEWS, AuditStore

T = 1_767_225_600_000_000_000


@pytest.fixture
def store_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = AuditStore(url)
    store.migrate()
    store.write([AuditEvent(T + i, "connection_blocked", dst_ip="1.1.1.1", dst_port=443,
                            protocol="TCP", process=name, would_deny=True, event_id=f"b-{i}",
                            host="h") for i, name in enumerate(["curl", "wget", "curl"])])
    store.close()
    return url


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port, path, deadline):
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return json.loads(reply.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_browse_serves_the_views_with_descriptions_read_only(store_url, tmp_path):
    port = free_port()
    log = open(tmp_path / "browse.log", "wb")  # a pipe nobody reads would block the server
    server = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.cli.entry import main; main()", "browse", "--db",
         store_url, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        rows = fetch(port, "/audit/blocked_destinations.json?_shape=array", deadline)
        with run_query(store_url, "SELECT * FROM blocked_destinations") as (columns, want):
            assert rows == [dict(zip(columns, row, strict=True)) for row in want]
        assert rows[0]["attempts"] == 3 and rows[0]["processes"] == "curl,wget"
        meta = fetch(port, "/-/metadata.json", deadline)["databases"]["audit"]
        assert set(VIEWS) <= set(meta["tables"])
        assert meta["tables"]["timeline"]["description"] == DESCRIPTIONS["timeline"]
        assert set(meta["queries"]) == set(QUERIES)
        top = fetch(port, "/audit/top_blocked.json?_shape=array", deadline)
        assert top == rows
        # Datasette opened the file read-only: a write through its SQL page fails.
        with pytest.raises(urllib.error.HTTPError):
            fetch(port, "/audit.json?sql=DELETE+FROM+audit_events", deadline)
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
    with run_query(store_url, "SELECT count(*) FROM audit_events") as (_, count):
        assert list(count) == [(3,)]


@pytest.mark.parametrize("db, message", [
    ("postgresql://u@127.0.0.1/x", "sluice browse opens a SQLite store"),
    ("sqlite:////nonexistent/audit.db", "/nonexistent/audit.db: no such store"),
])
def test_what_datasette_cannot_open_is_one_line(db, message):
    result = CliRunner().invoke(app, ["browse", "--db", db])
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
