"""Replay: a live run recorded at enrich, replayed offline under the same and a stricter policy,
and pushed back into a running pipeline."""

import json
import logging
import queue
import time

import pytest

from pipeline import messages
from pipeline.events import DnsMapping, RawEvent
from pipeline.loop import Counters
from pipeline.recording import Header, Recorder, RecordingWriter
from pipeline.replay import (NoReverseLookups, ReplayError, allow_request_for, parse_pace,
                             rejudge, replay_live, replay_offline)
from pipeline.rulemaps import ALLOW, DENY, DictRuleMaps
from pipeline.stages.enrich import EnrichStage
from pipeline.stages.persist import PersistStage
from pipeline.stages.policy import PolicyStage
from pipeline.audit.store import open_readonly
from tests.support.stagekit import Peer, StageThread, stage_settings
from tests.support.wait import wait_for

T0 = 1_767_225_600_000_000_000
TCP, UDP, ICMP, GRE = 6, 17, 1, 47
RULES = [
    {"type": "hostname", "value": "api.example.com", "action": "allow",
     "ports": [{"port": 443, "protocol": "tcp"}]},
    {"type": "hostname", "value": "www.example.org", "action": "allow",
     "ports": [{"port": 443, "protocol": "tcp"}]},
    {"type": "cidr", "value": "10.1.0.0/16", "action": "allow",
     "ports": [{"port": 443, "protocol": "tcp"}]},
]
ENV = {"SLUICE_DNS_UPSTREAM": "127.0.0.53", "SLUICE_ALLOW_EXISTING_CONNECTIONS": "false"}


def write_policy(path, rules):
    path.write_text(json.dumps({"defaultAction": "deny", "rules": rules}))
    return path


def packet(n, dst, port, proto=TCP, src_port=40000, flags=0):
    """What the classifier saw, before its verdict (rejudge fills that in)."""
    return RawEvent(4, False, proto, flags, "10.0.0.2", dst, src_port, port, T0 + n * 1000,
                    4000 + n, "curl", 1, "", 0, "")


# Steps of the live run: a DNS answer (through policy first, as dns does) or a packet.
STEPS = [
    DnsMapping("api.example.com", ["93.184.216.34"], 60, [], T0),
    packet(1, "93.184.216.34", 443),            # allowed: the answer opened it
    packet(2, "93.184.216.34", 80),             # blocked: another port
    packet(3, "10.1.2.3", 443),                 # allowed by the CIDR rule
    packet(4, "10.9.9.9", 5353, UDP, 5353),     # blocked UDP
    packet(5, "127.0.0.53", 53, UDP, 5353),     # allowed UDP: never reported
    packet(6, "5.5.5.5", 47, GRE, 0),           # protocol block
    packet(7, "5.5.5.5", 1, ICMP, 0),           # ICMP, denied
    DnsMapping("www.example.org", ["7.7.7.7"], 60, ["www.example.org", "cdn.example.net"], T0),
    packet(8, "7.7.7.7", 443),                  # allowed through the chain's origin
    packet(9, "10.1.2.3", 443, flags=0x01),     # allowed mid-stream: never reported
]


class PolicyWithDns(PolicyStage):
    """The policy stage plus the dns stage's allow requests, answered in its own loop."""

    def __init__(self, maps):
        super().__init__(open_maps=lambda _settings: maps)
        self.requests, self.answered = queue.Queue(), queue.Queue()

    def tick(self, now):
        super().tick(now)
        while not self.requests.empty():
            self.answered.put(self.reply("policy-allow", "allow_requests",
                                         [self.requests.get()]))


def outcomes(url):
    engine = open_readonly(url)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT timestamp, event_type, src_ip, dst_ip, dst_hostname, dst_port, protocol, "
                "process, pid, matched_rule, auto_allowed_type, cname_chain, would_deny, "
                "blocked, host FROM audit_events ORDER BY timestamp, event_type").fetchall()
    finally:
        engine.dispose()
    return [tuple(r) for r in rows]


def live_run(tmp_path, peer, policy_path):
    """Stages in threads with SLUICE_RECORD set; a fake kernel judges by the live maps."""
    settings = stage_settings(tmp_path, SLUICE_RECORD=str(tmp_path / "rec"),
                              SLUICE_POLICY=str(policy_path),
                              SLUICE_DB=f"sqlite:///{tmp_path}/live.db", **ENV)
    maps = DictRuleMaps()
    policy = PolicyWithDns(maps)
    stages = [StageThread(PersistStage(), settings).start(), StageThread(policy, settings).start(),
              StageThread(EnrichStage(reverse=NoReverseLookups()), settings).start()]
    push = peer.pusher("enrich")
    sent = 0
    try:
        for step in STEPS:
            if isinstance(step, DnsMapping):
                policy.requests.put(allow_request_for(step))
                assert policy.answered.get(timeout=5)
                push.send(messages.encode([step]))
                continue
            judged = rejudge(step, maps)
            if judged is not None:
                push.send(messages.encode([judged]))
                sent += 1
                wait_for(lambda sent=sent: stages[0].stage.io.counters.get("rows_inserted") >= sent,
                         f"{sent} rows stored")
    finally:
        assert [s.finish() for s in reversed(stages)] == [0, 0, 0]
    return settings, outcomes(settings.db)


def test_replaying_a_live_run_under_the_same_policy_gives_the_same_outcomes(tmp_path, peer):
    policy_path = write_policy(tmp_path / "policy.json", RULES)
    settings, live = live_run(tmp_path, peer, policy_path)
    assert [r[1] for r in live] == ["connection_allowed", "connection_blocked",
                                    "connection_allowed", "connection_blocked",
                                    "protocol_blocked", "protocol_blocked", "connection_allowed"]
    summary = replay_offline([tmp_path / "rec"], settings, policy_path,
                             f"sqlite:///{tmp_path}/replay.db", None, lambda n: None)
    assert outcomes(f"sqlite:///{tmp_path}/replay.db") == live
    assert (summary.events, summary.mappings, summary.rows_stored) == (7, 2, 7)
    assert summary.left_out == 0


def test_a_stricter_policy_turns_known_allowed_rows_into_blocked_ones(tmp_path, peer):
    policy_path = write_policy(tmp_path / "policy.json", RULES)
    settings, live = live_run(tmp_path, peer, policy_path)
    stricter = write_policy(tmp_path / "stricter.json", RULES[:1])  # no www.example.org, no CIDR
    url = f"sqlite:///{tmp_path}/what-if.db"
    summary = replay_offline([tmp_path / "rec"], settings, stricter, url, "enforce",
                             lambda n: None)
    what_if = {(r[3], r[5], r[6]): r for r in outcomes(url)}
    for dst in ("10.1.2.3", "7.7.7.7"):
        assert {r[1] for r in live if r[3] == dst} == {"connection_allowed"}
        assert what_if[(dst, 443, "TCP")][1] == "connection_blocked"
        assert what_if[(dst, 443, "TCP")][12:14] == (False, True)  # enforce: blocked
    assert what_if[("93.184.216.34", 443, "TCP")][1] == "connection_allowed"
    assert summary.outcomes["connection_blocked"] == 4 and summary.rows_stored == 7
    assert {r[14] for r in what_if.values()} == {"test-host"}  # the recording's host


@pytest.mark.parametrize("event, verdicts, expected", [
    (packet(1, "1.2.3.4", 443), ALLOW, "allowed"),
    (packet(1, "1.2.3.4", 443), DENY, "denied"),
    (packet(1, "1.2.3.4", 53, UDP), ALLOW, None),
    (packet(1, "1.2.3.4", 53, UDP), DENY, "denied"),
    (packet(1, "1.2.3.4", 443, flags=0x01), ALLOW, None),
    (packet(1, "1.2.3.4", 443, flags=0x01), DENY, "denied"),
    (packet(1, "1.2.3.4", 1, ICMP, 0), ALLOW, None),
    (packet(1, "1.2.3.4", 1, ICMP, 0), DENY, "denied"),
    (packet(1, "1.2.3.4", 47, GRE, 0), ALLOW, "denied"),
])
def test_rejudge_reports_what_the_classifier_would(event, verdicts, expected):
    maps = DictRuleMaps()
    maps.set_config(verdicts, False, 1)
    judged = rejudge(event, maps)
    assert (None if judged is None else "allowed" if judged.allowed else "denied") == expected


def test_an_allow_request_is_asked_under_the_chain_origin():
    chained = DnsMapping("cdn.example.net", ["7.7.7.7"], 30,
                         ["www.example.org", "cdn.example.net"], T0)
    assert allow_request_for(chained).name == "www.example.org"
    plain = allow_request_for(DnsMapping("a.example", ["1.1.1.1"], 30, [], T0))
    assert (plain.name, plain.ips, plain.ttl) == ("a.example", ["1.1.1.1"], 30)


@pytest.mark.parametrize("text, factor", [("recorded", 1.0), ("max", None), ("10", 10.0),
                                          ("0.5", 0.5)])
def test_pace(text, factor):
    assert parse_pace(text) == factor


@pytest.mark.parametrize("text", ["0", "-2", "fast", "inf", "nan"])
def test_a_bad_pace_is_one_line(text):
    with pytest.raises(ReplayError, match="--pace"):
        parse_pace(text)


def recording(path, frames, spacing_ns):
    clock = iter(range(T0, T0 + spacing_ns * len(frames) + 1, spacing_ns))
    rec = Recorder(RecordingWriter(path, 1 << 20, Header("h", "audit", T0)), Counters(),
                   logging.getLogger("t"), clock=lambda: next(clock))
    for batch in frames:
        rec.add("raw_events", batch)
    rec.close()
    return path


def test_live_replay_pushes_every_event_into_enrich_at_the_asked_pace(tmp_path, peer):
    path = recording(tmp_path / "rec", [[packet(n, "1.2.3.4", 1000 + n)] for n in range(6)],
                     100_000_000)  # 0.5 s recorded
    settings = stage_settings(tmp_path)
    out = peer.inbox("policy")
    enrich = StageThread(EnrichStage(reverse=NoReverseLookups()), settings).start()
    try:
        seen = []
        started = time.monotonic()
        summary = replay_live([path], settings.run_dir, 2.0, seen.append)
        took = time.monotonic() - started
        got = Peer.receive(out, 6)
    finally:
        assert enrich.finish() == 0
    assert [e.dst_port for e in got] == [1000 + n for n in range(6)]
    assert 0.25 <= took < 2.0 and seen == [1, 2, 3, 4, 5, 6]
    assert (summary.events, summary.frames, round(summary.recorded_seconds, 1)) == (6, 6, 0.5)


def test_live_replay_without_a_pipeline_says_so(tmp_path):
    path = recording(tmp_path / "rec", [[packet(1, "1.2.3.4", 1)]], 1)
    with pytest.raises(ReplayError, match="no pipeline is listening"):
        replay_live([path], tmp_path / "run", None, lambda n: None)
