"""Alert storms are summarized, not dropped; notify's memory is written by persist alone.

Breakage 7: in a 100,000-destination scan notify sent 112 webhooks and dropped 61,725
notices (queue_dropped); those destinations were never alerted and the receiver was not
told that a storm happened.
"""

import sqlite3

from pipeline import messages
from pipeline.events import Notice
from pipeline.notify import SUMMARY_EVENT, Notification, Storm
from pipeline.stages.notify import NotifyStage
from pipeline.stages.persist import PersistStage
from pipeline.audit.store import AuditStore
from tests.support.stagekit import Peer, StageThread, stage_settings
from tests.support.tools.httpsink import HttpSink
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000


def notification(n, process="curl", port=443):
    ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
    return Notification(f"{ip}:{port}", "", ip, port, "TCP", process, T0 + n, "enforce",
                        "connection_blocked")


def test_a_storm_counts_per_process_and_port_and_names_the_first():
    storm = Storm()
    for n in range(50):
        storm.add(notification(n, process="scanner" if n % 5 else "curl",
                               port=443 if n % 2 else 80))
    summary = storm.take()
    assert not storm and storm.take() is None
    body = summary.body("runner-1")
    assert (body["event_type"], body["destinations_count"], body["more"]) == (SUMMARY_EVENT,
                                                                              50, 30)
    assert body["by_process"] == {"scanner": 40, "curl": 10}
    assert body["by_port"] == {"443/TCP": 25, "80/TCP": 25}
    assert body["destinations"][:2] == ["10.0.0.0:80", "10.0.0.1:443"]
    assert body["first_seen"] == "2025-11-24T16:00:00Z"
    assert body["see"].startswith('sluice query "SELECT * FROM blocked_destinations WHERE '
                                  "host = 'runner-1'")
    assert len(summary.members) == 50


def test_a_summary_given_back_is_counted_in_the_next_one():
    storm = Storm(max_keys=3)
    for n in range(4):
        storm.add(notification(n))
    lost = storm.take()
    storm.add(notification(9, process="late"))
    storm.give_back(lost)
    again = storm.take()
    assert again.count == 5 and again.by_process == {"curl": 4, "late": 1}
    assert [m.key for m in again.members] == ["10.0.0.0:443", "10.0.0.1:443", "10.0.0.2:443"]
    assert again.destinations[0] == "10.0.0.0:443" and again.first_seen_ns == T0


def test_a_flood_of_process_names_stays_bounded():
    storm = Storm()
    for n in range(5000):
        storm.add(notification(n, process=f"p{n}"))
    assert len(storm.processes) <= 1001
    summary = storm.take()
    assert len(summary.by_process) <= 21 and sum(summary.by_process.values()) == 5000


def test_a_scan_faster_than_the_webhook_is_alerted_or_summarized_every_destination(
        tmp_path, peer):
    destinations = 3000
    with HttpSink(delay=0.02) as sink:
        settings = stage_settings(tmp_path, SLUICE_NOTIFY_URL=sink.url)
        persist = StageThread(PersistStage(), settings).start()  # creates the table
        notify = StageThread(NotifyStage(max_pending=20, summary_interval=0.5),
                             settings).start()
        push = peer.pusher("notify")
        for start in range(0, destinations, 500):
            push.send(messages.encode([
                Notice("connection_blocked", "", n.ip, 443, "TCP", "scanner", 7,
                       n.first_seen_ns, "enforce")
                for n in map(notification, range(start, start + 500))]))
        wait_for(lambda: notify.counters().get("delivered", 0)
                 + notify.counters().get("summarized", 0) == destinations,
                 "every destination alerted or summarized", timeout=60)
        wait_for(lambda: persist.counters().get("delivered_stored") == destinations,
                 "every delivered destination remembered", timeout=30)
        assert notify.finish() == 0
        assert persist.finish() == 0
    bodies = sink.delivered()
    singles = [b for b in bodies if b["event_type"] == "connection_blocked"]
    summaries = [b for b in bodies if b["event_type"] == SUMMARY_EVENT]
    assert summaries, "the storm was summarized"
    assert len(singles) + sum(s["destinations_count"] for s in summaries) == destinations
    named = {d for s in summaries for d in s["destinations"]}
    assert not named & {f"{b['ip']}:443" for b in singles}, "no destination in both"
    assert all(s["by_process"] == {"scanner": s["destinations_count"]} for s in summaries)
    counters = notify.counters()
    assert "queue_dropped" not in counters and counters["stormed"] == counters["summarized"]
    db = sqlite3.connect(f"{tmp_path}/audit.db")
    assert db.execute("SELECT count(DISTINCT destination) FROM notified_destinations")\
        .fetchone() == (destinations,)
    db.close()


def test_notify_never_writes_the_store(tmp_path, peer):
    """Issue 9 item 2: notify's memory must not contend with persist's writes. With the
    store locked for writing the whole time, notify still delivers and hands the keys on."""
    with HttpSink() as sink:
        settings = stage_settings(tmp_path, SLUICE_NOTIFY_URL=sink.url)
        store = AuditStore(settings.db)
        store.migrate()
        store.close()
        to_persist = peer.inbox("persist")
        notify = StageThread(NotifyStage(), settings).start()
        lock = sqlite3.connect(f"{tmp_path}/audit.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # from now on, no other connection may write
        try:
            push = peer.pusher("notify")
            push.send(messages.encode([Notice("connection_blocked", "", f"10.9.0.{n}", 443,
                                              "TCP", "curl", 7, T0, "enforce")
                                       for n in range(50)]))
            wait_for(lambda: len(sink.delivered()) == 50, "every delivery")
            records = Peer.receive(to_persist, 50)
            assert notify.finish() == 0
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    assert sorted(r.destination for r in records) == sorted(f"10.9.0.{n}:443"
                                                            for n in range(50))
    assert {r.host for r in records} == {"test-host"}
