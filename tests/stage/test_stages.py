"""enrich and policy on real ipc:// sockets, each in a thread, fed and read by the test."""

import json
import threading

import msgpack
import pytest
import zmq

from pipeline import messages
from pipeline.errors import KernelError
from pipeline.events import AllowRequest, RawEvent
from pipeline.firewall.recentblocks import RecentBlocks
from pipeline.loop import BaseStage, run_stage
from pipeline.rulemaps import ALLOW, DENY, DictRuleMaps
from pipeline.names.reverse import ReverseResolver
from pipeline.stages.enrich import EnrichStage
from pipeline.stages.policy import PolicyStage
from pipeline.topology import inbox_address
from tests.support.stagekit import Peer, StageThread, stage_settings
from tests.support.tools.ptrserver import PtrServer
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000


def raw(dst="93.184.216.34", port=443, allowed=False, proto=6, src_port=40000):
    return RawEvent(4, allowed, proto, 0, "10.0.0.2", dst, src_port, port, T0, 77, "curl", 1, "",
                    0, "")


def test_enrich_forwards_every_event_and_survives_garbage(tmp_path, peer):
    settings = stage_settings(tmp_path)
    out = peer.inbox("policy")
    with PtrServer({}) as names:  # answers NXDOMAIN: no names, and no host resolver asked
        stage = StageThread(EnrichStage(ReverseResolver("127.0.0.1", port=names.port)),
                            settings).start()
        _push_and_check(stage, peer, out)


def _push_and_check(stage, peer, out):
    push = peer.pusher("enrich")
    push.send(b"\x00garbage")
    push.send(msgpack.packb({"kind": "raw_events", "v": 3, "records": [[1, 2, 3]]}))
    push.send(messages.encode([raw(port=p) for p in range(1, 1201)]))
    got = Peer.receive(out, 1200)
    assert stage.finish() == 0
    assert [e.dst_port for e in got] == list(range(1, 1201))
    assert got[0].protocol == "TCP" and got[0].comm == "curl" and got[0].dst_hostname == ""
    counters = stage.counters()
    assert counters["malformed_messages"] == 1 and counters["malformed_records"] == 1
    assert counters["raw_events_received"] == 1200 and counters["policy_sent"] == 1200


def write_policy(tmp_path, policy):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return str(path)


def test_policy_programs_the_maps_then_decides_outcomes(tmp_path, peer):
    maps = DictRuleMaps()
    policy = {"defaultAction": "deny", "rules": [
        {"type": "cidr", "value": "10.1.0.0/16", "action": "allow",
         "ports": [{"port": 443, "protocol": "tcp"}]}]}
    settings = stage_settings(tmp_path, SLUICE_POLICY=write_policy(tmp_path, policy),
                              SLUICE_MODE="enforce", SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    out = peer.inbox("persist")
    stage = StageThread(PolicyStage(open_maps=lambda s: maps), settings).start()
    assert maps.get_config() == (DENY, False, 1)
    assert maps.verdict("10.1.7.9", 443, 6) == ALLOW
    assert maps.verdict("10.1.7.9", 80, 6) == DENY
    push = peer.pusher("policy")
    push.send(messages.encode(
        [messages.REGISTRY["enriched_events"].from_raw(e) for e in
         (raw(dst="10.1.7.9", allowed=True), raw(port=80), raw(proto=47, src_port=0, port=47))]))
    records = Peer.receive(out, 3)
    assert stage.finish() == 0
    assert [r.event_type for r in records] == [
        "connection_allowed", "connection_blocked", "protocol_blocked"]
    assert [(r.would_deny, r.blocked) for r in records] == [
        (False, False), (False, True), (False, True)]
    assert len({r.event_id for r in records}) == 3 and records[0].host == "test-host"


def test_an_event_that_reaches_policy_before_its_answers_mapping_is_named_by_the_answer(
        tmp_path, peer):
    """enrich could not name the connection (its mapping came after the event): the answer
    policy opened the address for names it; enrich's own name, when it has one, stays."""
    maps = DictRuleMaps()
    policy = {"defaultAction": "deny", "rules": [
        {"type": "hostname", "value": "example.com", "action": "allow"}]}
    settings = stage_settings(tmp_path, SLUICE_POLICY=write_policy(tmp_path, policy),
                              SLUICE_MODE="enforce", SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    out = peer.inbox("persist")
    stage = StageThread(PolicyStage(open_maps=lambda s: maps), settings).start()
    ask = peer.ctx.socket(zmq.REQ)
    ask.connect(f"ipc://{peer.run_dir}/policy-allow.sock")
    peer.sockets.append(ask)
    chain = ["www.example.com", "edge.cdn.test"]
    ask.send(messages.encode([AllowRequest("r1", "www.example.com", ["10.9.0.1", "10.9.0.2"],
                                           0, chain, T0)]))
    [reply] = messages.decode(ask.recv())[1]
    assert reply.ok and maps.verdict("10.9.0.1", 443, 6) == ALLOW
    enriched = messages.REGISTRY["enriched_events"].from_raw
    push = peer.pusher("policy")
    push.send(messages.encode([
        enriched(raw(dst="10.9.0.1", allowed=True)),
        enriched(raw(dst="10.9.0.2", allowed=True), "api.example.com"),  # enrich named it
        enriched(raw(dst="10.9.0.3", allowed=False))]))  # never in an answer
    records = Peer.receive(out, 3)
    assert stage.finish() == 0
    assert [(r.dst_ip, r.dst_hostname, r.cname_chain) for r in records] == [
        ("10.9.0.1", "www.example.com", chain), ("10.9.0.2", "api.example.com", []),
        ("10.9.0.3", "", [])]
    assert stage.counters()["named_by_answers"] == 1


def test_blocks_not_kept_for_late_allow_are_counted_and_logged_once(tmp_path, peer, caplog):
    """Full of live blocks (a scan's), the late-allow memory refuses new ones: never silently."""
    settings = stage_settings(tmp_path, SLUICE_MODE="enforce",
                              SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    out = peer.inbox("persist")
    stage = StageThread(PolicyStage(open_maps=lambda s: DictRuleMaps(), clock=lambda: T0,
                                    recent=RecentBlocks(capacity=2)), settings).start()
    enriched = messages.REGISTRY["enriched_events"].from_raw
    push = peer.pusher("policy")
    for batch in ([raw(dst="10.7.0.1"), raw(dst="10.7.0.2"), raw(dst="10.7.0.3")],
                  [raw(dst="10.7.0.1"), raw(dst="10.7.0.4")]):  # a kept one repeats
        push.send(messages.encode([enriched(e) for e in batch]))
    records = Peer.receive(out, 5)
    assert stage.finish() == 0
    assert [r.event_type for r in records] == ["connection_blocked"] * 5
    counters = stage.counters()
    assert counters["recent_blocks"] == 2 and counters["recent_blocks_refused"] == 2
    assert [r.getMessage() for r in caplog.records
            if "recent blocks are full" in r.getMessage()] == [
        "recent blocks are full (2 live): blocks of new destinations are not kept for "
        "late-allow until entries expire (counted as recent_blocks_refused)"]


def test_policy_waits_for_the_maps_before_it_is_ready(tmp_path, peer):
    maps = DictRuleMaps()
    available = []
    settings = stage_settings(tmp_path, SLUICE_POLICY=write_policy(tmp_path, {}))
    stage = StageThread(PolicyStage(open_maps=lambda s: maps if available else None), settings)
    stage.start(wait_ready=False)
    ready = settings.run_dir / "policy.ready"
    assert not wait_for_nothing(lambda: ready.exists(), 0.5)
    available.append(True)
    wait_for(ready.exists, "policy ready once the maps appear")
    assert maps.get_config()[2] == 1
    assert stage.finish() == 0


def wait_for_nothing(predicate, seconds):
    try:
        return wait_for(predicate, "", timeout=seconds)
    except AssertionError:
        return False


@pytest.mark.parametrize("text, message", [
    ("{not json", "policy.json:1:2"),
    ('{"rules": [{"type": "cidr", "value": "10.0.0.0/33", "action": "allow"}]}', "rules[0]"),
    ('{"rules": [{"type": "hostname", "value": "x.com", "action": "permit"}]}', "rules[0].action"),
])
def test_a_bad_policy_stops_the_stage_with_one_line(tmp_path, text, message):
    path = tmp_path / "policy.json"
    path.write_text(text)
    settings = stage_settings(tmp_path, SLUICE_POLICY=str(path))
    stage = StageThread(PolicyStage(open_maps=lambda s: DictRuleMaps()), settings)
    stage.start(wait_ready=False)
    stage.thread.join(10)
    assert stage.exit_code == 3
    failed = (settings.run_dir / "policy.failed").read_text()
    assert failed.count("\n") == 1 and message in failed


class _StoppedWhileStarting(BaseStage):
    """A stage whose set-up fails because a stop came in the middle of it."""

    name = "policy"

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def setup(self, io) -> None:
        self.stop.set()
        raise KernelError("cannot load sluice.c: no answer from the compiler")


def test_a_stage_stopped_while_starting_is_not_reported_failed(tmp_path):
    settings = stage_settings(tmp_path)
    stop = threading.Event()
    assert run_stage(_StoppedWhileStarting(stop), settings, stop=stop) == 0
    assert not (settings.run_dir / "policy.failed").exists()


class _SaysReady(BaseStage):
    """Says it is ready from a timer, and looks at once for the marker wait-ready reads."""

    name = "probe"

    def __init__(self, stop: threading.Event) -> None:
        self.stop, self.marked = stop, False

    def setup(self, io) -> None:
        self.io = io
        io.reactor.after(0, self._ready)

    def _ready(self) -> None:
        self.io.ready = True
        self.marked = (self.io.settings.run_dir / "probe.ready").exists()
        self.stop.set()


def test_a_stage_is_marked_ready_the_moment_it_says_so(tmp_path):
    """Before anything it starts next (notify's delivery thread) can be seen outside."""
    stop = threading.Event()
    stage = _SaysReady(stop)
    assert run_stage(stage, stage_settings(tmp_path), stop=stop) == 0
    assert stage.marked


def test_a_full_audit_path_never_holds_back_an_allow_request(tmp_path, peer):
    """persist takes nothing (its inbox is bound and never read): policy stops taking events,
    and still answers the dns stage's requests, opening the maps first."""
    maps = DictRuleMaps()
    policy = {"defaultAction": "deny", "rules": [
        {"type": "hostname", "value": "allowed.test", "action": "allow",
         "ports": [{"port": 443, "protocol": "tcp"}]}]}
    settings = stage_settings(tmp_path, SLUICE_POLICY=write_policy(tmp_path, policy),
                              SLUICE_MODE="enforce", SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    persist = peer.ctx.socket(zmq.PULL)  # bound, never read, and holding one batch at most
    persist.setsockopt(zmq.RCVHWM, 1)
    persist.setsockopt(zmq.LINGER, 0)
    persist.bind(f"ipc://{settings.run_dir}/persist.sock")
    peer.sockets.append(persist)
    stage = StageThread(PolicyStage(open_maps=lambda s: maps), settings).start()
    push = peer.pusher("policy")
    batch = messages.encode([messages.REGISTRY["enriched_events"].from_raw(raw(port=p))
                             for p in range(1, 513)])
    sent = 0
    for _ in range(200):  # far more than the queues to persist hold
        push.send(batch)
        sent += 512
    wait_for(lambda: stage.counters().get("enriched_events_received", 0) > 0, "events taken")
    request = peer.ctx.socket(zmq.REQ)
    peer.sockets.append(request)
    request.setsockopt(zmq.LINGER, 0)
    request.connect(inbox_address(settings.run_dir, "policy-allow"))
    request.send(messages.encode([AllowRequest("r1", "www.allowed.test", ["192.0.2.7"], 60, [],
                                               T0)]))
    assert request.poll(10_000), "no answer while the audit path is full"
    [reply] = messages.decode(request.recv())[1]
    assert (reply.request_id, reply.ok, reply.allowed_ips) == ("r1", True, ["192.0.2.7"])
    assert maps.verdict("192.0.2.7", 443, 6) == ALLOW
    taken = stage.counters().get("enriched_events_received", 0)
    assert taken < sent, "every event was taken: the audit path never filled up"
    assert stage.finish() == 0
