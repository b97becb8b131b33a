"""enrich on real ipc:// sockets, naming against a local DNS server that answers PTR queries."""

import json

import msgspec
import pytest

from pipeline import messages
from pipeline.events import DnsMapping, RawEvent
from pipeline.names.namer import LookupBudget
from pipeline.names.reverse import ReverseResolver
from pipeline.stages.enrich import EnrichStage
from tests.support.stagekit import Peer, StageThread, stage_settings
from tests.support.tools.ptrserver import PtrServer
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000
POLICY = {"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": "allowed.example", "action": "allow"}]}


def event(dst, port=443, comm="curl"):
    return RawEvent(4, False, 6, 0, "10.0.0.2", dst, 40000, port, T0, 77, comm, 1, "", 0, "")


@pytest.fixture
def settings(tmp_path):
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    return stage_settings(tmp_path, SLUICE_POLICY=str(tmp_path / "policy.json"))


def start(settings, server, **kw):
    timeout = kw.pop("timeout", 0.5)
    resolver = ReverseResolver("127.0.0.1", port=server.port, timeout=timeout)
    return StageThread(EnrichStage(resolver, **kw), settings).start()


def test_known_names_flow_past_slow_lookups_and_every_slow_event_still_arrives(
        settings, peer):
    slow = [f"10.100.{i // 250}.{i % 250 + 1}" for i in range(1000)]
    known = [f"10.9.0.{i + 1}" for i in range(20)]
    with PtrServer({ip: f"slow-{n}.example." for n, ip in enumerate(slow)}, delay=2.0) as dns:
        out = peer.inbox("policy")
        # Every slow address is looked up.
        stage = start(settings, dns, max_lookups=1000, budget=LookupBudget(burst=1000))
        push = peer.pusher("enrich")
        push.send(messages.encode([DnsMapping(f"known-{n}.example", [ip], 60, [], T0)
                                   for n, ip in enumerate(known)]))
        # A steady stream: each message one event to a new slow address, one to a known one.
        for i, ip in enumerate(slow):
            push.send(messages.encode([event(ip, port=i), event(known[i % 20], port=i)]))
        got = Peer.receive(out, 2000, timeout=30)
        assert stage.finish() == 0

    position = {(e.dst_ip, e.dst_port): n for n, e in enumerate(got)}
    assert len(position) == 2000, "every event arrives exactly once"
    for i, ip in enumerate(slow):
        # The known event sent after the slow one overtook it: it did not wait.
        assert position[(known[i % 20], i)] < position[(ip, i)]
    names = {(e.dst_ip, e.dst_hostname) for e in got}
    assert {(ip, f"known-{n}.example") for n, ip in enumerate(known)} <= names
    assert {(ip, "") for ip in slow} <= names, "2 s answers come after the 500 ms budget"
    counters = stage.counters()
    assert counters["ptr_lookups"] == 1000
    assert counters.get("ptr_timeout", 0) + counters.get("ptr_not_sent", 0) == 1000
    assert counters["events_named"] == 1000 and counters["policy_sent"] == 2000


def test_a_ptr_name_names_every_held_event_in_order_and_is_asked_once(settings, peer):
    names = {"10.1.0.1": "Web-3.Allowed.Example."}
    with PtrServer(names, delay=0.2) as dns:
        out = peer.inbox("policy")
        stage = start(settings, dns)
        push = peer.pusher("enrich")
        push.send(messages.encode([event("10.1.0.1", port=p) for p in (1, 2, 3)] +
                                  [event("10.1.0.2", port=9)]))
        push.send(messages.encode([event("10.1.0.1", port=p) for p in (4, 5)]))
        first = Peer.receive(out, 6)
        push.send(messages.encode([event("10.1.0.1", port=6), event("10.1.0.2", port=10)]))
        later = Peer.receive(out, 2)
        assert stage.finish() == 0
        questions = list(dns.questions)

    named = [(e.dst_port, e.dst_hostname, e.comm) for e in first + later
             if e.dst_ip == "10.1.0.1"]
    assert named == [(p, "allowed.example", "curl") for p in range(1, 7)]
    assert [e.dst_hostname for e in first + later if e.dst_ip == "10.1.0.2"] == ["", ""]
    assert sorted(questions) == ["10.1.0.1", "10.1.0.2"], "one attempt per address"
    counters = stage.counters()
    assert (counters["ptr_named"], counters["ptr_no_name"], counters["names_from_lookups"]) == (
        1, 1, 1)


def test_mappings_name_events_and_a_cname_chain_names_its_origin(settings, peer):
    with PtrServer({}) as dns:
        out = peer.inbox("policy")
        stage = start(settings, dns)
        push = peer.pusher("enrich")
        push.send(messages.encode([
            DnsMapping("api.site.example", ["10.2.0.1"], 60, [], T0),
            DnsMapping("edge.cdn.example", ["10.2.0.2"], 60,
                       ["allowed.example", "edge.cdn.example"], T0)]))
        push.send(messages.encode([event("10.2.0.1"), event("10.2.0.2")]))
        got = Peer.receive(out, 2)
        assert stage.finish() == 0
        assert dns.questions == [], "known addresses are not looked up"
    assert [(e.dst_hostname, e.cname_chain) for e in got] == [
        ("api.site.example", []), ("allowed.example", ["allowed.example", "edge.cdn.example"])]


def test_held_events_over_the_bound_go_on_unnamed_in_order(settings, peer):
    with PtrServer({}, delay=2.0) as dns:
        out = peer.inbox("policy")
        stage = start(settings, dns, max_held=3, timeout=10)
        push = peer.pusher("enrich")
        push.send(messages.encode([event("10.3.0.1", port=1), event("10.3.0.1", port=2),
                                   event("10.3.0.2", port=3), event("10.3.0.3", port=4),
                                   event("10.3.0.1", port=5)]))
        got = Peer.receive(out, 3)
        assert [(e.dst_ip, e.dst_port) for e in got] == [
            ("10.3.0.1", 1), ("10.3.0.1", 2), ("10.3.0.1", 5)]
        assert stage.finish() == 0
        rest = Peer.receive(out, 2)
    assert sorted(e.dst_port for e in rest) == [3, 4], "a stop sends what still waits"
    counters = stage.counters()
    assert (counters["held_over_limit"], counters["held_at_stop"]) == (2, 2)


def test_lookups_beyond_the_bound_are_not_made_and_a_later_event_may_make_them(
        settings, peer):
    with PtrServer({"10.4.0.2": "late.example."}) as dns:
        out = peer.inbox("policy")
        stage = start(settings, dns, max_lookups=1)
        push = peer.pusher("enrich")
        push.send(messages.encode([event("10.4.0.1"), event("10.4.0.2")]))
        first = Peer.receive(out, 2)
        wait_for(lambda: stage.counters().get("ptr_no_name"), "the first lookup to end")
        push.send(messages.encode([event("10.4.0.2")]))
        [later] = Peer.receive(out, 1)
        assert stage.finish() == 0
    assert [e.dst_hostname for e in first] == ["", ""]
    assert later.dst_hostname == "late.example"
    assert stage.counters()["ptr_busy"] == 1


def test_a_scan_past_the_lookup_budget_goes_on_unnamed_and_a_later_event_may_look_up(
        settings, peer):
    names = {f"10.6.0.{i}": f"host-{i}.example." for i in range(1, 6)}
    with PtrServer(names) as dns:
        out = peer.inbox("policy")
        stage = start(settings, dns, budget=LookupBudget(rate=1.0, burst=2))
        push = peer.pusher("enrich")
        push.send(messages.encode([event(ip) for ip in names]))  # five new addresses at once
        first = Peer.receive(out, 5)
        wait_for(lambda: stage.counters().get("ptr_named", 0) == 2, "the two lookups to end")
        # A second later: one token.
        later = msgspec.structs.replace(event("10.6.0.5"), timestamp_ns=T0 + 1_000_000_000)
        push.send(messages.encode([later]))
        [named] = Peer.receive(out, 1)
        assert stage.finish() == 0
    assert sorted(e.dst_hostname for e in first) == ["", "", "", "host-1.example",
                                                      "host-2.example"]
    assert named.dst_hostname == "host-5.example"
    counters = stage.counters()
    assert (counters["ptr_lookups"], counters["ptr_over_budget"]) == (3, 3)
    assert dns.questions.count("10.6.0.5") == 1, "looked up once, by the later event"


def test_names_follow_a_changed_policy(settings, peer, tmp_path):
    names = {"10.5.0.1": "web-1.allowed.example.", "10.5.0.2": "web-2.allowed.example."}
    with PtrServer(names) as dns:
        out = peer.inbox("policy")
        stage = start(settings, dns)
        push = peer.pusher("enrich")
        push.send(messages.encode([event("10.5.0.1")]))
        [before] = Peer.receive(out, 1)
        (tmp_path / "policy.json").write_text(json.dumps({"defaultAction": "deny"}))
        wait_for(lambda: stage.counters().get("policy_reloads"), "the reload")
        push.send(messages.encode([event("10.5.0.2")]))
        [after] = Peer.receive(out, 1)
        assert stage.finish() == 0
    assert (before.dst_hostname, after.dst_hostname) == ("allowed.example",
                                                         "web-2.allowed.example")
