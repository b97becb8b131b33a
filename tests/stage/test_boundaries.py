"""Hostile messages at every inbox: each is a counted rejection, never a dead stage.

Each test first sends what once broke a stage (issue "hostile input at every boundary"),
then a good message, and checks that the good one is served and the bad one counted.
"""

import json
import logging

import msgpack
import pytest
import zmq

from pipeline import messages
from pipeline.events import AllowRequest, EnrichedEvent, Notice, RawEvent
from pipeline.names.reverse import ReverseResolver
from pipeline.rulemaps import DictRuleMaps
from pipeline.stages.enrich import EnrichStage
from pipeline.stages.notify import NotifyStage
from pipeline.stages.policy import PolicyStage
from pipeline.audit.store import AuditStore
from pipeline.topology import inbox_address
from tests.support.stagekit import Peer, StageThread, stage_settings
from tests.support.tools.httpsink import HttpSink
from tests.support.tools.ptrserver import PtrServer
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000
ALLOW_ALL = {"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": "ok.test", "action": "allow"},
    {"type": "cidr", "value": "10.1.0.0/16", "action": "allow"}]}


def raw(dst="10.1.0.9", allowed=True, port=443):
    return RawEvent(4, allowed, 6, 0, "10.0.0.2", dst, 40000, port, T0, 77, "curl", 1, "", 0,
                    "")


def enriched(dst="10.1.0.9", allowed=True):
    return EnrichedEvent.from_raw(raw(dst, allowed))


def as_array(record, **changes):
    values = dict(zip(record.__struct_fields__, record.to_wire(), strict=True))
    values.update(changes)
    return list(values.values())


def frame(kind, *arrays):
    version = messages.REGISTRY[kind].VERSION if kind in messages.REGISTRY else 1
    return msgpack.packb({"kind": kind, "v": version, "records": list(arrays)})


def policy_stage(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(ALLOW_ALL))
    settings = stage_settings(tmp_path, SLUICE_POLICY=str(path), SLUICE_MODE="enforce",
                              SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    return StageThread(PolicyStage(open_maps=lambda s: DictRuleMaps()), settings).start()


def allow_frame(name="ok.test", ips=("10.9.0.1",)):
    return messages.encode([AllowRequest("r1", name, list(ips), 60, [], T0)])


def test_a_multipart_allow_request_is_rejected_and_policy_keeps_serving(tmp_path, peer):
    """Breakage 1: the REP loop read one frame of a multipart request, its reply raised
    EFSM and policy exited."""
    stage = policy_stage(tmp_path)
    req = peer.ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 5000)
    req.connect(inbox_address(tmp_path / "run", "policy-allow"))
    peer.sockets.append(req)
    req.send_multipart([allow_frame(), b"a second frame"])
    assert req.recv() == b""  # rejected, answered
    dealer = peer.ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(inbox_address(tmp_path / "run", "policy-allow"))
    peer.sockets.append(dealer)
    dealer.send_multipart([b"", allow_frame(), allow_frame(), b""])
    assert dealer.recv_multipart() == [b"", b""]
    dealer.send_multipart([b"", frame("allow_requests", ["r", "ok.test", ["999.1.1.1"], 60,
                                                          [], T0])])
    assert dealer.recv_multipart() == [b"", b""]  # its one record was out of range
    req.send(allow_frame())
    _, [reply], _ = messages.decode(req.recv())
    assert reply.ok and reply.allowed_ips == ["10.9.0.1"]
    assert stage.thread.is_alive()
    assert stage.finish() == 0
    counters = stage.counters()
    assert counters["malformed_messages"] == 2 and counters["malformed_records"] == 1
    assert counters["allow_requests"] == 1 and counters["allow_requests_rejected"] == 1


@pytest.mark.parametrize("bad_ip", ["999.999.1.1", "::ffff:zzzz", "", "10.1.0.9/32",
                                    "fe80::1%lo", "10.1.0.9\x00"])
def test_an_unparseable_address_never_reaches_policy_logic(tmp_path, peer, bad_ip):
    """Breakage 2: an allowed record with dst_ip 999.999.1.1 raised ValueError in policy."""
    stage = policy_stage(tmp_path)
    out = peer.inbox("persist")
    push = peer.pusher("policy")
    push.send(frame("enriched_events", as_array(enriched(), dst_ip=bad_ip),
                    as_array(enriched(), src_ip=bad_ip)))
    push.send(messages.encode([enriched()]))
    [record] = Peer.receive(out, 1)
    assert record.dst_ip == "10.1.0.9" and record.event_type == "connection_allowed"
    assert stage.finish() == 0
    counters = stage.counters()
    assert counters["malformed_records"] == 2 and counters["enriched_events_received"] == 1


def test_enrich_counts_and_drops_a_bad_address_instead_of_passing_it_on(tmp_path, peer):
    out = peer.inbox("policy")
    with PtrServer({}) as names:
        stage = StageThread(EnrichStage(ReverseResolver("127.0.0.1", port=names.port)),
                            stage_settings(tmp_path)).start()
        push = peer.pusher("enrich")
        push.send(frame("raw_events", as_array(raw(), dst_ip="999.999.1.1"),
                        as_array(raw(), dst_port=70_000), as_array(raw(), pid=-1),
                        as_array(raw(), comm="x" * 17), as_array(raw(), ip_version=5)))
        push.send(frame("dns_mappings", ["ok.test", ["not-an-ip"], 60, [], T0]))
        push.send(messages.encode([raw()]))
        [event] = Peer.receive(out, 1)
        assert stage.finish() == 0
    assert event.dst_ip == "10.1.0.9"
    assert stage.counters()["malformed_records"] == 6


def test_an_out_of_range_notice_is_rejected_and_alerts_keep_flowing(tmp_path, peer, caplog):
    """Breakage 3: a port or pid of 2**63 raised OverflowError in the delivery thread,
    which died; no webhook was sent again."""
    caplog.set_level(logging.WARNING)
    good = Notice("connection_blocked", "", "10.7.0.1", 443, "TCP", "curl", 77, T0, "enforce")
    with HttpSink() as sink:
        settings = stage_settings(tmp_path, SLUICE_NOTIFY_URL=sink.url)
        store = AuditStore(settings.db)
        store.migrate()
        store.close()
        stage = StageThread(NotifyStage(), settings).start()
        push = peer.pusher("notify")
        push.send(frame("notices", as_array(good, port=2 ** 63), as_array(good, pid=2 ** 63),
                        as_array(good, mode="permissive"), as_array(good, ip="10.7.0.300")))
        push.send(messages.encode([good]))
        wait_for(lambda: sink.delivered(), "the good notice delivered")
        assert stage.finish() == 0
    assert [(b["ip"], b["port"]) for b in sink.delivered()] == [("10.7.0.1", 443)]
    assert stage.counters()["malformed_records"] == 4
    # Logged once per reason, each naming the field.
    for field in ("port", "pid", "mode", "ip"):
        assert f"field {field} " in caplog.text


def test_the_same_rejection_is_logged_once(tmp_path, peer, caplog):
    caplog.set_level(logging.WARNING)
    stage = policy_stage(tmp_path)
    out = peer.inbox("persist")
    push = peer.pusher("policy")
    for n in range(50):
        push.send(frame("enriched_events", as_array(enriched(), dst_ip=f"999.0.0.{n}")))
        push.send(frame(f"kind-{n}"))
        push.send_multipart([b"a", b"b"])
    push.send(messages.encode([enriched()]))
    Peer.receive(out, 1)
    assert stage.finish() == 0
    assert caplog.text.count("field dst_ip is not an IP address") == 1
    assert caplog.text.count("unknown kind") == 1
    assert caplog.text.count("several frames") == 1
    counters = stage.counters()
    assert (counters["malformed_records"], counters["malformed_messages"]) == (50, 100)
