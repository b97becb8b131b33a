"""A feed passes on what one turn of a stage's loop gave it as few full messages: under a
flood many small batches arrive together, and each message costs every stage on its way."""

import threading

import zmq

from pipeline import messages
from pipeline.audit.records import AuditEvent
from pipeline.events import DnsMapping, RawEvent
from pipeline.loop import Counters, Feed
from pipeline.rulemaps import DictRuleMaps
from pipeline.stages.policy import PolicyStage
from tests.support.stagekit import StageThread, stage_settings
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000


def raw(port: int) -> RawEvent:
    return RawEvent(4, False, 6, 0, "10.0.0.2", "10.9.0.1", 40000, port, T0, 77, "curl", 1, "",
                    0, "")


def mapping(n: int) -> DnsMapping:
    return DnsMapping(f"host{n}.test", ["192.0.2.1"], 60, [], T0)


def feed_to(peer, name: str, batch_max: int, backpressure: bool = True, backlog: int = 16,
            queue: int = 16) -> tuple[Feed, zmq.Socket, Counters]:
    inbox = peer.inbox(name, queue)
    push = peer.pusher(name, queue)
    counters = Counters()
    return Feed(push, name, counters, backlog, backpressure, batch_max), inbox, counters


def messages_in(sock: zmq.Socket) -> list[tuple[str, list]]:
    out = []
    while sock.poll(200):
        kind, records, bad = messages.decode(sock.recv())
        assert not bad
        out.append((kind, records))
    return out


def test_what_one_turn_sends_leaves_as_one_message_at_the_flush(peer):
    feed, inbox, counters = feed_to(peer, "policy", batch_max=512)
    for port in range(1, 41, 8):  # five small batches in one turn
        feed.send([raw(p) for p in range(port, port + 8)])
    assert feed.pending() == 40
    assert not inbox.poll(100), "sent before the loop's flush"
    feed.flush()
    [(kind, records)] = messages_in(inbox)
    assert kind == "raw_events"
    assert [r.dst_port for r in records] == list(range(1, 41))
    assert (feed.pending(), counters.get("policy_sent")) == (0, 40)


def test_a_full_batch_leaves_at_once_and_no_message_exceeds_batch_max(peer):
    feed, inbox, counters = feed_to(peer, "policy", batch_max=16)
    feed.send([raw(p) for p in range(1, 11)])
    feed.send([raw(p) for p in range(11, 51)])  # 50 held: three full batches go now
    sizes = [len(records) for _, records in messages_in(inbox)]
    assert sizes == [16, 16, 16]
    feed.flush()
    rest = messages_in(inbox)
    assert [len(records) for _, records in rest] == [2]
    assert [r.dst_port for r in rest[0][1]] == [49, 50]
    assert counters.get("policy_sent") == 50


def test_records_of_another_kind_end_the_message_and_keep_their_order(peer):
    feed, inbox, counters = feed_to(peer, "enrich", batch_max=512)
    feed.send([mapping(1), mapping(2)])
    feed.send([raw(1)])
    feed.send([mapping(3)])
    feed.flush()
    got = messages_in(inbox)
    assert [(kind, len(records)) for kind, records in got] == [
        ("dns_mappings", 2), ("raw_events", 1), ("dns_mappings", 1)]


def test_an_observers_feed_drops_beyond_its_backlog_and_accounts_for_every_record(peer):
    """An observer's feed (no back-pressure) to a full peer drops what is beyond its backlog,
    counted; what it still holds is pending: sent + dropped + pending = given."""
    feed, inbox, counters = feed_to(peer, "notify", batch_max=4, backpressure=False, backlog=2,
                                    queue=1)
    for n in range(200):
        feed.send([AuditEvent(T0 + n, "connection_blocked", "10.0.0.2", "10.9.0.1", "", n + 1,
                              "TCP", "curl", 1)])
    feed.flush()
    sent, dropped = counters.get("notify_sent"), counters.get("notify_dropped")
    assert dropped > 0
    assert sent + dropped + feed.pending() == 200
    assert feed.pending() <= 2 * 4


class HeldPolicy(PolicyStage):
    """The policy stage, held in its first batch until the test lets it go on."""

    def __init__(self, go_on: threading.Event, **kwargs) -> None:
        super().__init__(**kwargs)
        self.go_on = go_on
        self.batches = 0

    def handle(self, inbox: str, kind: str, records: list) -> None:
        self.batches += 1
        if self.batches == 1:
            assert self.go_on.wait(30), "never let go on"
        super().handle(inbox, kind, records)


def test_a_backlog_of_small_batches_leaves_the_stage_in_fewer_messages(tmp_path, peer):
    """24 batches of 8 events wait while policy is busy with an earlier one: it passes them
    on to persist in fewer messages than it took, every record once and in order. (Before,
    every batch in was one message out.)"""
    settings = stage_settings(tmp_path, SLUICE_MODE="audit",
                              SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    persist = peer.inbox("persist")
    peer.inbox("notify")  # takes the notices
    go_on = threading.Event()
    stage = HeldPolicy(go_on, open_maps=lambda s: DictRuleMaps())
    running = StageThread(stage, settings).start()
    push = peer.pusher("policy")
    batches, size = 24, 8
    try:
        for b in range(batches):
            push.send(messages.encode([messages.REGISTRY["enriched_events"].from_raw(
                raw(b * size + n + 1)) for n in range(size)]))
        wait_for(lambda: stage.batches == 1, "policy holding its first batch")
        go_on.set()
        records, count = [], 0
        while len(records) < batches * size:
            assert persist.poll(10_000), f"{len(records)} records arrived, then nothing"
            records += messages.decode(persist.recv())[1]
            count += 1
        assert [r.dst_port for r in records] == list(range(1, batches * size + 1))
        assert count < batches, f"{count} messages out for {batches} in"
        assert stage.batches == batches
    finally:
        go_on.set()
        assert running.finish() == 0
