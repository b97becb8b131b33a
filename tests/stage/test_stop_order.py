"""A stop in the pipeline's order: each stage ends once the stages feeding it that are
stopping have sent their last records and their feed end (pipeline/stopping.py)."""

import time

from pipeline import messages
from pipeline.audit.records import AuditEvent
from pipeline.events import FeedEnd
from pipeline.loop import Counters, Feed
from pipeline.rulemaps import DictRuleMaps
from pipeline.stages.persist import PersistStage
from pipeline.stages.policy import PolicyStage
from pipeline.stopping import QUIET_S
from tests.support.persistkit import jsonl_fields
from tests.support.stagekit import StageThread, stage_settings

T0 = 1_767_225_600_000_000_000


def blocked(n: int) -> AuditEvent:
    return AuditEvent(T0 + n, "connection_blocked", "10.0.0.2", f"10.9.{n // 250}.{n % 250}",
                      "", 443, "TCP", "curl", 4000, would_deny=True, event_id=f"stop-{n:05d}")


class LatePolicy(PolicyStage):
    """A policy stage that passes on records at its stop, after longer than a quiet inbox
    lasts: as capture does with what it claims from the kernel at the stop."""

    def __init__(self, late: list[AuditEvent], **kwargs) -> None:
        super().__init__(**kwargs)
        self.late = late

    def finish(self) -> None:
        time.sleep(2 * QUIET_S)
        self.persist.send(self.late)


def test_a_stage_ends_after_the_last_records_of_a_stopping_upstream(tmp_path):
    """Both stop at once; the records policy sends at its stop come 0.6 s later, yet persist
    stores them all before it ends. (Before, persist ended once its inbox was quiet for
    0.3 s, and they waited for the next start.)"""
    settings = stage_settings(tmp_path, SLUICE_MODE="audit",
                              SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    late = [blocked(n) for n in range(500)]
    persist = StageThread(PersistStage(), settings).start()
    policy = StageThread(LatePolicy(late, open_maps=lambda s: DictRuleMaps()), settings).start()
    policy.stop.set()
    persist.stop.set()
    assert policy.finish() == 0 and persist.finish() == 0
    assert len(jsonl_fields(settings.audit_log)) == len(late)
    assert persist.counters()["feed_ends_received"] == 1
    assert not (settings.run_dir / "persist.stopping").exists()


def test_a_feed_end_goes_last_and_only_to_a_stage_that_runs(tmp_path, peer):
    """policy stops: a running persist (its ready marker names a live process) gets the feed
    end after every record; notify, whose marker is missing, gets none."""
    settings = stage_settings(tmp_path, SLUICE_MODE="audit",
                              SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    to_persist, to_notify = peer.inbox("persist"), peer.inbox("notify")
    (settings.run_dir / "persist.ready").write_text("pid=1\n")  # init: always alive
    late = [blocked(n) for n in range(20)]
    policy = StageThread(LatePolicy(late, open_maps=lambda s: DictRuleMaps()), settings).start()
    assert policy.finish() == 0
    got = []
    while to_persist.poll(500):
        kind, records, _ = messages.decode(to_persist.recv())
        got += [(kind, r) for r in records]
    assert [r for kind, r in got[:-1]] == late
    assert got[-1][0] == "feed_ends"
    assert got[-1][1].stage == "policy" and got[-1][1].pid > 1
    assert not to_notify.poll(300), "a feed end to a stage that does not run"


def test_a_feed_end_is_never_dropped_on_an_observers_full_feed(peer):
    inbox = peer.inbox("notify", queue=1)
    push = peer.pusher("notify", queue=1)
    feed = Feed(push, "notify", Counters(), backlog=1, backpressure=False, batch_max=4)
    for n in range(40):
        feed.send([blocked(n)])
    feed.flush()
    feed.end(messages.encode([FeedEnd("policy", 7)]))
    assert not feed.empty, "the peer is full: the feed end waits"
    last = None
    deadline = time.monotonic() + 10
    while not (feed.empty and last == "feed_ends"):
        assert time.monotonic() < deadline, "the feed end never arrived"
        if inbox.poll(100):
            last = messages.decode(inbox.recv())[0]
        feed.flush()
    assert feed.pending() == 0


def test_a_stop_waits_no_longer_than_its_deadline_for_an_upstream_that_never_ends(tmp_path,
                                                                                  caplog):
    """enrich says it is stopping but never sends its feed end (stuck, or killed mid-stop
    with its marker left): policy still ends, by its deadline, and says what it left."""
    settings = stage_settings(tmp_path, SLUICE_MODE="audit",
                              SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    for marker in ("ready", "stopping"):
        (settings.run_dir / f"enrich.{marker}").write_text("pid=1\n")
    policy = StageThread(PolicyStage(open_maps=lambda s: DictRuleMaps()), settings).start()
    assert policy.finish() == 0  # within StageThread's 10 s
    assert policy.counters()["stop_time_up"] == 1
    assert ("stopped at the stop's 3 s limit (enrich still sending): what was on its way waits "
            "in capture's journal for the next start") in caplog.text
