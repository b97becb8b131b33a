"""The views shipped with the schema, on SQLite and PostgreSQL, against a fixture with known
answers."""

import pytest

from pipeline.audit.records import AuditEvent, sql_timestamp
from pipeline.audit.query import run_query
from pipeline.audit.store import AuditStore

T = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
S = 1_000_000_000


def at(seconds: int) -> str:
    return sql_timestamp(T + seconds * S)


def row(n, host, seconds, event_type, dst_ip="", port=0, protocol="", name="", process="",
        rule=""):
    return AuditEvent(T + seconds * S, event_type, src_ip="10.0.0.2" if dst_ip else "",
                      dst_ip=dst_ip, dst_hostname=name, dst_port=port, protocol=protocol,
                      process=process, pid=100 + n, matched_rule=rule, would_deny=True,
                      event_id=f"fixture-{n}", host=host)


API = dict(dst_ip="1.1.1.1", port=443, name="api.example.com")
FIXTURE = [
    row(1, "h1", 10, "connection_blocked", protocol="TCP", process="curl", **API),
    row(2, "h1", 20, "connection_blocked", protocol="TCP", process="wget", **API),
    # Supersedes 1 and 2 (same host, address, port, protocol; at or after them) ...
    row(3, "h1", 20, "connection_late_allowed", protocol="TCP", process="curl",
        rule="*.example.com", **API),
    # ... but not a block after it, nor one over UDP, nor one on another host.
    row(4, "h1", 90, "connection_blocked", protocol="TCP", process="curl", **API),
    row(11, "h1", 15, "connection_blocked", protocol="UDP", process="curl", **API),
    row(12, "h2", 5, "connection_blocked", protocol="TCP", process="curl", **API),
    row(5, "h1", 30, "connection_blocked", "2.2.2.2", 80, "TCP", process="python"),
    row(6, "h1", 70, "connection_blocked", "2.2.2.2", 80, "TCP", process="node"),
    row(7, "h1", 40, "protocol_blocked", "3.3.3.3", 0, "GRE", process="ping"),
    row(8, "h1", 50, "connection_allowed", "4.4.4.4", 443, "TCP", "github.com", "git"),
    row(9, "h1", 60, "dns_blocked", name="evil.test"),
    row(10, "h1", 65, "dns_blocked", name="evil.test"),
]


@pytest.fixture
def fixture_db(db_url):
    store = AuditStore(db_url)
    store.migrate()
    assert store.write(FIXTURE) == len(FIXTURE)
    store.close()
    return db_url


def select(url, sql):
    with run_query(url, sql) as (columns, rows):
        return [dict(zip(columns, r, strict=True)) for r in rows]


def test_blocked_destinations_leaves_out_superseded_blocks(fixture_db):
    got = select(fixture_db, "SELECT * FROM blocked_destinations "
                             "ORDER BY host, destination, protocol")
    assert got == [
        dict(host="h1", destination="2.2.2.2", port=80, protocol="TCP", attempts=2,
             first_seen=at(30), last_seen=at(70), processes="node,python"),
        dict(host="h1", destination="3.3.3.3", port=0, protocol="GRE", attempts=1,
             first_seen=at(40), last_seen=at(40), processes="ping"),
        dict(host="h1", destination="api.example.com", port=443, protocol="TCP", attempts=1,
             first_seen=at(90), last_seen=at(90), processes="curl"),
        dict(host="h1", destination="api.example.com", port=443, protocol="UDP", attempts=1,
             first_seen=at(15), last_seen=at(15), processes="curl"),
        dict(host="h2", destination="api.example.com", port=443, protocol="TCP", attempts=1,
             first_seen=at(5), last_seen=at(5), processes="curl"),
    ]


def test_process_activity(fixture_db):
    got = select(fixture_db, "SELECT host, process, events, allowed, blocked, late_allowed, "
                             "destinations, first_seen, last_seen FROM process_activity "
                             "ORDER BY host, process")
    assert [tuple(r.values()) for r in got] == [
        ("h1", "curl", 4, 1, 2, 1, 1, at(10), at(90)),
        ("h1", "git", 1, 1, 0, 0, 1, at(50), at(50)),
        ("h1", "node", 1, 0, 1, 0, 1, at(70), at(70)),
        ("h1", "ping", 1, 0, 1, 0, 1, at(40), at(40)),
        ("h1", "python", 1, 0, 1, 0, 1, at(30), at(30)),
        ("h1", "wget", 1, 0, 0, 0, 1, at(20), at(20)),
        ("h2", "curl", 1, 0, 1, 0, 1, at(5), at(5)),
    ]


def test_dns_blocked_names(fixture_db):
    assert select(fixture_db, "SELECT * FROM dns_blocked_names") == [
        dict(host="h1", name="evil.test", attempts=2, first_seen=at(60), last_seen=at(65))]


def test_late_allowed(fixture_db):
    assert select(fixture_db, "SELECT * FROM late_allowed") == [
        dict(host="h1", destination="api.example.com", dst_ip="1.1.1.1", port=443,
             protocol="TCP", matched_rule="*.example.com", late_allows=1, first_seen=at(20),
             last_seen=at(20), processes="curl")]


def test_timeline_per_minute(fixture_db):
    got = select(fixture_db, "SELECT * FROM timeline ORDER BY host, minute")
    assert [tuple(r.values()) for r in got] == [
        # host, minute, events, allowed, blocked, superseded, late_allowed, dns_blocked
        ("h1", "2026-01-01T00:00Z", 7, 2, 3, 2, 1, 0),
        ("h1", "2026-01-01T00:01Z", 4, 0, 2, 0, 0, 2),
        ("h2", "2026-01-01T00:00Z", 1, 0, 1, 0, 0, 0),
    ]


def test_every_row_is_classified_once(fixture_db):
    got = select(fixture_db, "SELECT event_id, destination, superseded, counted_block "
                             "FROM audit_events_counted ORDER BY event_id")
    superseded = {r["event_id"] for r in got if r["superseded"]}
    counted = {r["event_id"] for r in got if r["counted_block"]}
    assert len(got) == len(FIXTURE)
    assert superseded == {"fixture-1", "fixture-2"}
    assert counted == {f"fixture-{n}" for n in (4, 5, 6, 7, 11, 12)}
