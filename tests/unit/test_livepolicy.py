"""The live policy every stage judges by (pipeline/livepolicy.py): one loader, one reload
path, counted; and enrich names by the same policy the map writer and the DNS filter use."""

import json
import logging
import os
import threading
from pathlib import Path

import pytest

from pipeline import messages
from pipeline.errors import PolicyError
from pipeline.events import RawEvent
from pipeline.livepolicy import LivePolicy
from pipeline.loop import StageIO
from pipeline.hostfiles import HostFiles
from pipeline.names.reverse import ReverseResolver
from pipeline.stages.enrich import EnrichStage
from tests.support.stagekit import Peer, StageThread, stage_settings
from tests.support.tools.ptrserver import PtrServer

POLICY = {"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": "allowed.example", "action": "allow"}]}


class Files(HostFiles):
    """The host files as a table: the resolver the proxy would forward to."""

    def read(self, path: str) -> str:
        return {"/etc/resolv.conf": "nameserver 10.53.0.1\n"}.get(path, "")


class Clock:
    """The stage's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def live(tmp_path: Path, applied: list, **env) -> tuple[LivePolicy, StageIO]:
    path = tmp_path / "policy.json"
    if not path.exists():
        path.write_text(json.dumps(POLICY))
    settings = stage_settings(tmp_path, SLUICE_POLICY=str(path), **env)
    io = StageIO("policy", settings, None, threading.Event(), logging.getLogger("test"),
                 Clock())
    return LivePolicy(io, applied.append, Files()), io


def at(io: StageIO, seconds: float) -> None:
    """Move the stage's clock and run the timers due by then, as the loop does."""
    io.reactor.clock.now = seconds
    io.reactor.run_due()


def rewrite(path: Path, policy) -> None:
    """A new text and a new mtime (a same-second rewrite may keep the old one)."""
    path.write_text(policy if isinstance(policy, str) else json.dumps(policy))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_the_loaded_policy_is_the_start_up_policy_with_what_sluice_needs(tmp_path):
    policy, _ = live(tmp_path, [])
    assert [(r.value, r.auto_added_type) for r in policy.current.auto_rules] == [
        ("10.53.0.1/32", "dns")]
    assert "allowed.example" in policy.current.tracked_hostnames


def test_a_changed_file_is_applied_and_counted(tmp_path):
    applied = []
    policy, io = live(tmp_path, applied)
    at(io, 1.0)
    assert applied == [] and io.counters.get("policy_reloads") == 0
    rewrite(tmp_path / "policy.json", {"defaultAction": "allow"})
    at(io, 1.5)  # the file is looked at once per interval
    assert applied == []
    at(io, 2.0)
    assert [p.default_action for p in applied] == ["allow"]
    assert policy.current is applied[0]
    assert io.counters.snapshot() == {"policy_reloads": 1}


@pytest.mark.parametrize("text", ["{ not json", "[" * 100_000,
                                  json.dumps({"rules": [{"type": "host"}]})])
def test_a_policy_that_does_not_load_changes_nothing_and_is_counted(tmp_path, text):
    applied = []
    policy, io = live(tmp_path, applied)
    before = policy.current
    rewrite(tmp_path / "policy.json", text)
    at(io, 1.0)
    assert applied == [] and policy.current is before
    assert io.counters.snapshot() == {"policy_reload_failures": 1}


def test_a_hangup_rereads_an_unchanged_file_and_the_watch_does_not_report_it_again(tmp_path):
    applied = []
    policy, io = live(tmp_path, applied)
    rewrite(tmp_path / "policy.json", {"defaultAction": "allow"})
    assert policy.reload("SIGHUP")
    at(io, 1.0)
    assert len(applied) == 1 and io.counters.get("policy_reloads") == 1


def test_a_policy_that_does_not_load_at_start_stops_the_stage(tmp_path):
    (tmp_path / "policy.json").write_text("{ not json")
    with pytest.raises(PolicyError):
        live(tmp_path, [])


def test_enrich_names_by_the_ci_preset_hosts_policy_allows(tmp_path, peer):
    """The namer tracks the hostnames the start-up policy adds (here the CI preset's), so a
    reverse lookup under one is reported by the name policy judges it by."""
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    settings = stage_settings(tmp_path, SLUICE_POLICY=str(tmp_path / "policy.json"),
                              GITHUB_ACTIONS="true", SLUICE_GITHUB_SERVICE_HOSTS="svc.ci.example")
    with PtrServer({"10.7.0.1": "node-7.svc.ci.example."}) as names:
        out = peer.inbox("policy")
        stage = StageThread(EnrichStage(ReverseResolver("127.0.0.1", port=names.port)),
                            settings).start()
        peer.pusher("enrich").send(messages.encode([RawEvent(
            4, False, 6, 0, "10.0.0.2", "10.7.0.1", 40000, 443, 1, 7, "curl", 1, "", 0, "")]))
        [named] = Peer.receive(out, 1)
        assert stage.finish() == 0
    assert named.dst_hostname == "svc.ci.example"
