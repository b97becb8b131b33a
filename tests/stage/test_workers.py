"""Helper threads cannot die silently: an error is logged and counted and the thread goes
on, or the stage exits non-zero; `sluice status` shows each thread's state.

Breakage 3 (its second half): notify's delivery thread died on one bad notice, the process
looked healthy, and no webhook was sent again.
"""

import json
import logging
import threading

import pytest
from typer.testing import CliRunner

from pipeline import messages
from pipeline.cli.app import app
from pipeline.events import Notice, RawEvent
from pipeline.webhook import WebhookClient
from pipeline.names.reverse import ReverseResolver
from pipeline.stages.enrich import EnrichStage
from pipeline.stages.notify import NotifyStage
from pipeline.audit.store import AuditStore
from pipeline.workers import Worker, WorkerDied
from tests.support.stagekit import Peer, StageThread, stage_settings
from tests.support.tools.httpsink import HttpSink
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000
log = logging.getLogger("test")


class Boom(BaseException):
    """What no `except Exception` catches: the thread ends."""


def test_a_failing_body_is_logged_counted_and_started_again(caplog):
    stopping = threading.Event()
    calls = []

    def body():
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError(f"failure {len(calls)}")
        stopping.wait()

    worker = Worker("helper", body, log, stopping=stopping, pause_s=0)
    worker.start()
    wait_for(lambda: len(calls) == 3, "the third start")
    assert (worker.errors, worker.state()) == (2, "alive")
    worker.check()
    stopping.set()
    worker.thread.join(5)
    assert worker.state() == "stopped"
    assert caplog.text.count("helper thread failed (RuntimeError: failure") == 2


def test_a_body_that_keeps_failing_makes_the_worker_dead():
    def body():
        raise ValueError("always")

    worker = Worker("helper", body, log, max_errors=3, pause_s=0)
    worker.start()
    wait_for(lambda: worker.state() == "dead", "the worker given up")
    assert worker.errors == 3
    with pytest.raises(WorkerDied, match="helper thread died .3 errors within 60 s, the last: "
                                         "ValueError: always"):
        worker.check()


ENDED_THREAD = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning")  # what these tests make happen


@ENDED_THREAD
def test_a_thread_that_ends_while_the_stage_runs_is_dead():
    def body():
        raise Boom()

    worker = Worker("helper", body, log)
    worker.start()
    worker.thread.join(5)
    assert worker.state() == "dead"
    with pytest.raises(WorkerDied, match="its thread ended"):
        worker.check()


# ---------------------------------------------------------------- notify's courier

NOTICE = Notice("connection_blocked", "", "10.7.0.1", 443, "TCP", "curl", 77, T0, "enforce")


class FlakyClient:
    """A webhook client that fails `failures` times with an error of sluice's own."""

    def __init__(self, url, failures=1, error=RuntimeError):
        self.client = WebhookClient(url)
        self.failures, self.error = failures, error

    def send(self, notification):
        if self.failures:
            self.failures -= 1
            raise self.error("a bug in a client")
        self.client.send(notification)


def notify(tmp_path, client, **kw):
    settings = stage_settings(tmp_path, SLUICE_NOTIFY_URL="http://127.0.0.1:9/hook")
    store = AuditStore(settings.db)
    store.migrate()
    store.close()
    return StageThread(NotifyStage(client=client, delay=lambda attempt: 0.05, **kw), settings)


def test_an_internal_error_in_a_delivery_is_retried_and_the_courier_lives_on(tmp_path, caplog,
                                                                             peer):
    with HttpSink() as sink:
        stage = notify(tmp_path, FlakyClient(sink.url)).start()
        peer.pusher("notify").send(messages.encode([NOTICE]))
        wait_for(lambda: sink.delivered(), "the delivery after the error")
        wait_for(lambda: stage.counters().get("delivered"), "the delivery counted")
        status = CliRunner().invoke(app, ["status"], env={
            "SLUICE_RUN_DIR": str(stage.settings.run_dir)})
        assert stage.finish() == 0
    counters = stage.counters()
    assert (counters["internal_errors"], counters["delivery_failures"], counters["delivered"]) \
        == (1, 1, 1)
    assert "delivery of 10.7.0.1:443 failed on an internal error" in caplog.text
    assert "threads: courier alive" in status.output


@ENDED_THREAD
def test_a_dead_courier_stops_notify_with_a_non_zero_exit(tmp_path, peer):
    stage = notify(tmp_path, FlakyClient("http://127.0.0.1:9/", error=Boom)).start()
    peer.pusher("notify").send(messages.encode([NOTICE]))
    stage.thread.join(10)
    assert stage.exit_code == WorkerDied.exit_code
    failed = (stage.settings.run_dir / "notify.failed").read_text()
    assert failed.startswith("courier thread died (its thread ended)")
    final = json.loads((stage.settings.run_dir / "notify.counters.json").read_text())
    assert final["threads"] == {"courier": "dead"}


# ---------------------------------------------------------------- enrich's lookups

class BrokenResolver(ReverseResolver):
    def _ask(self, question, name, rdtype):
        raise RuntimeError("a bug in a lookup")


def test_a_failing_lookup_is_counted_and_its_event_goes_on(tmp_path, peer):
    out = peer.inbox("policy")
    stage = StageThread(EnrichStage(BrokenResolver("127.0.0.1", port=9)),
                        stage_settings(tmp_path)).start()
    peer.pusher("enrich").send(messages.encode(
        [RawEvent(4, False, 6, 0, "10.0.0.2", "10.9.0.1", 4000, 443, T0, 7, "curl", 1, "", 0,
                  "")]))
    [event] = Peer.receive(out, 1)
    wait_for(lambda: stage.counters().get("lookups_thread_errors"), "the error counted")
    assert stage.thread.is_alive()
    assert stage.finish() == 0
    assert event.dst_hostname == "" and stage.counters()["ptr_error"] == 1
    final = json.loads((stage.settings.run_dir / "enrich.counters.json").read_text())
    assert final["threads"] == {"lookups": "stopped"}


# ---------------------------------------------------------------- export's couriers

def test_an_internal_error_in_an_export_send_is_a_failed_send_and_the_thread_lives(caplog):
    """export's delivery thread caught only DeliveryFailed: any other error ended it, and the
    stage went on running with nothing exported again."""
    from pipeline.export.delivery import Courier

    sent = []

    def send(job):
        if not sent:
            sent.append("failed")
            raise KeyError("a bug in an encoder")
        sent.append(job)

    courier = Courier("otlp", send, log)
    try:
        courier.submit("first")
        [failed] = wait_for(courier.results, "the first result")
        assert failed.error.reason == "internal error: KeyError"
        courier.submit("first")  # what the stage does with a failed send: again, later
        [retried] = wait_for(courier.results, "the retry's result")
        assert retried.error is None and sent == ["failed", "first"]
        assert courier.worker.state() == "alive"
    finally:
        courier.stop(1)
        courier.close()
    assert "a send failed on an internal error" in caplog.text
