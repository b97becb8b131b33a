"""notify on real ipc:// sockets, posting to a local HTTP sink, remembering in SQLite."""

import logging

from pipeline import messages
from pipeline.events import Notice
from pipeline.stages.notify import NotifyStage
from pipeline.stages.persist import PersistStage
from pipeline.audit.store import AuditStore
from tests.support.stagekit import StageThread, stage_settings
from tests.support.tools.httpsink import HttpSink
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000
TOKEN = "tok-3f9a-very-secret"


def notice(hostname="blocked.example", ip="10.7.0.1", port=443, event_type="connection_blocked"):
    return Notice(event_type, hostname, ip, port, "TCP", "curl", 77, T0, "enforce")


def quick(attempt: int) -> float:
    return 0.05 * attempt


def webhook_settings(tmp_path, sink, migrate=True):
    settings = stage_settings(tmp_path, SLUICE_NOTIFY_URL=sink.url, SLUICE_NOTIFY_TOKEN=TOKEN)
    if migrate:
        store = AuditStore(settings.db)
        store.migrate()
        store.close()
    return settings


def run_notify(settings, **kw):
    return StageThread(NotifyStage(delay=quick, **kw), settings).start()


def test_fifty_blocks_to_one_destination_are_one_post_and_two_destinations_two(
        tmp_path, peer, caplog):
    caplog.set_level(logging.DEBUG)
    with HttpSink() as sink:
        settings = webhook_settings(tmp_path, sink)
        stage = run_notify(settings)
        push = peer.pusher("notify")
        for _ in range(50):
            push.send(messages.encode([notice()]))
        push.send(messages.encode([notice(hostname="", ip="10.7.0.2", port=47,
                                          event_type="protocol_blocked")] * 3))
        wait_for(lambda: stage.counters().get("notices_received") == 53, "every notice")
        wait_for(lambda: len(sink.delivered()) == 2, "two posts")
        assert stage.finish() == 0
    bodies = sorted(sink.delivered(), key=lambda b: b["ip"])
    assert [(b["hostname"], b["ip"], b["port"], b["event_type"]) for b in bodies] == [
        ("blocked.example", "10.7.0.1", 443, "connection_blocked"),
        ("", "10.7.0.2", 47, "protocol_blocked")]
    assert len(sink.requests) == 2
    assert all(r["headers"]["Authorization"] == f"Bearer {TOKEN}" for r in sink.requests)
    counters = stage.counters()
    assert (counters["delivered"], counters["duplicates_suppressed"]) == (2, 51)
    assert TOKEN not in caplog.text and "secret-path" not in caplog.text
    counters_file = (settings.run_dir / "notify.counters.json").read_text()
    assert TOKEN not in counters_file


def test_a_sink_that_fails_twice_gets_the_notice_on_the_third_try(tmp_path, peer):
    with HttpSink(fail_first=2) as sink:
        stage = run_notify(webhook_settings(tmp_path, sink))
        push = peer.pusher("notify")
        push.send(messages.encode([notice()]))
        wait_for(lambda: sink.delivered(), "the delivery")
        push.send(messages.encode([notice()]))  # after delivery: still a duplicate
        wait_for(lambda: stage.counters().get("notices_received") == 2, "the repeat")
        assert stage.finish() == 0
    assert [r["status"] for r in sink.requests] == [500, 500, 200]
    counters = stage.counters()
    assert (counters["delivery_failures"], counters["retries"], counters["delivered"]) == (2, 2, 1)


def test_a_key_given_up_on_is_released_and_its_next_block_tries_again(tmp_path, peer):
    with HttpSink(fail_first=2) as sink:
        stage = run_notify(webhook_settings(tmp_path, sink), max_attempts=2)
        push = peer.pusher("notify")
        push.send(messages.encode([notice()]))
        wait_for(lambda: stage.counters().get("gave_up") == 1, "giving up")
        push.send(messages.encode([notice()]))
        wait_for(lambda: sink.delivered(), "the later delivery")
        assert stage.finish() == 0
    assert [r["status"] for r in sink.requests] == [500, 500, 200]


def test_a_restart_does_not_post_a_delivered_destination_again(tmp_path, peer):
    """notify hands what it delivered to persist, the store's writer, and reads it back."""
    with HttpSink() as sink:
        settings = webhook_settings(tmp_path, sink)
        persist = StageThread(PersistStage(), settings).start()
        first = run_notify(settings)
        push = peer.pusher("notify")
        push.send(messages.encode([notice()]))
        wait_for(lambda: sink.delivered(), "the first delivery")
        wait_for(lambda: persist.counters().get("delivered_stored"), "the key stored")
        assert first.finish() == 0
        second = run_notify(settings)
        push.send(messages.encode([notice(), notice(ip="10.7.0.9", hostname="")]))
        wait_for(lambda: len(sink.delivered()) == 2, "the new destination")
        assert second.finish() == 0
        assert persist.finish() == 0
    assert [b["ip"] for b in sink.delivered()] == ["10.7.0.1", "10.7.0.9"]
    assert second.counters()["duplicates_suppressed"] == 1
    assert persist.counters()["delivered_stored"] == 2


def test_a_dead_sink_never_stops_the_inbox_draining(tmp_path, peer):
    with HttpSink(delay=3) as sink:
        stage = run_notify(webhook_settings(tmp_path, sink), max_pending=10)
        push = peer.pusher("notify")
        for batch in range(20):
            push.send(messages.encode([notice(hostname="", ip=f"10.8.{batch}.{i}")
                                       for i in range(100)]))
        wait_for(lambda: stage.counters().get("notices_received") == 2000, "every notice")
        counters = stage.counters()
        # What does not fit waits for a summary; nothing is dropped.
        assert counters["stormed"] == 1990 and counters.get("delivered", 0) == 0
        assert stage.finish() == 0


def test_notify_waits_for_persist_to_create_its_table(tmp_path, peer):
    with HttpSink() as sink:
        settings = webhook_settings(tmp_path, sink, migrate=False)
        stage = StageThread(NotifyStage(delay=quick), settings).start(wait_ready=False)
        push = peer.pusher("notify")
        push.send(messages.encode([notice()]))
        wait_for(lambda: stage.counters().get("notices_received") == 1, "the early notice")
        assert not (settings.run_dir / "notify.ready").exists()
        store = AuditStore(settings.db)
        store.migrate()
        store.close()
        wait_for(lambda: sink.delivered(), "the early notice delivered")
        assert (settings.run_dir / "notify.ready").exists()
        assert stage.finish() == 0


def test_without_a_url_each_new_destination_is_one_log_line(tmp_path, peer, caplog):
    caplog.set_level(logging.INFO)
    stage = StageThread(NotifyStage(), stage_settings(tmp_path)).start()
    push = peer.pusher("notify")
    push.send(messages.encode([notice()] * 5 + [notice(port=80)]))
    wait_for(lambda: stage.counters().get("notices_received") == 6, "every notice")
    assert stage.finish() == 0
    lines = [m for m in caplog.messages if m.startswith("blocked destination")]
    assert [line.split(" (")[0] for line in lines] == [
        "blocked destination blocked.example:443", "blocked destination blocked.example:80"]
    assert stage.counters()["duplicates_suppressed"] == 4
