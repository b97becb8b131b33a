"""Nothing capture takes from the kernel is lost: kill -9, a stop with a backlog, a full journal.

Each test floods blocked UDP datagrams, each to its own destination, from the client
namespace (enforce mode, default deny), breaks the pipeline in one way, starts it again,
and checks that every destination is stored exactly once, in SQL and JSONL alike.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.journal import unstored_records
from pipeline.kernel.loader import cgroup2_mounts
from tests.support.netns import ROOT, Lab
from tests.support.pipeline import Pipeline
from tests.support.tools.flood import destinations
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

TARGETS = ["10.202.0.1", "10.202.0.2", "10.202.0.3", "10.202.0.4"]
FIRST_PORT = 1024
STAGES = ("capture", "enrich", "policy", "persist")  # the audit path, in order


def flooding(lab: Lab, count: int, per_second: float = 0, per_flow: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        lab.exec_args(lab.client) + [sys.executable, "-m", "tests.support.tools.flood", str(count),
                                     "--to", *TARGETS, "--first-port", str(FIRST_PORT),
                                     "--per-second", str(per_second),
                                     "--per-flow", str(per_flow)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)


def flood_done(proc: subprocess.Popen, count: int) -> None:
    result = json.loads(proc.communicate(timeout=120)[0])
    assert result == {**result, "judged": count, "errors": {}}, result


def flood_rows(pipeline: Pipeline) -> collections.Counter:
    """How often each flooded destination is stored (SQL)."""
    return collections.Counter(
        (r["dst_ip"], r["dst_port"]) for r in pipeline.rows()
        if r["dst_ip"] in TARGETS and r["event_type"] == "connection_blocked")


def flood_stored(pipeline: Pipeline) -> int:
    """How many flood rows are stored (SQL), counted by the database: the waits poll this
    often, and reading every row each time would take a core from the pipeline under test."""
    db = sqlite3.connect(f"file:{pipeline.tmp}/audit.db?mode=ro", uri=True)
    try:
        marks = ", ".join("?" * len(TARGETS))
        return db.execute("SELECT count(*) FROM audit_events WHERE event_type = "
                          f"'connection_blocked' AND dst_ip IN ({marks})", TARGETS).fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # no table yet: persist has not started
    finally:
        db.close()


def assert_each_stored_once(pipeline: Pipeline, count: int) -> None:
    stored = flood_rows(pipeline)
    assert sum(stored.values()) == count and len(stored) == count, (
        f"{len(stored)} destinations in {sum(stored.values())} rows, {count} sent")
    rows = {r["event_id"] for r in pipeline.rows() if r["dst_ip"] in TARGETS}
    lines = [line["event_id"] for line in pipeline.jsonl() if line.get("dst_ip") in TARGETS]
    assert len(lines) == len(set(lines)) and set(lines) == rows, "JSONL and SQL disagree"


def restart_until_stored(pipeline: Pipeline, count: int, timeout: float = 90) -> None:
    before = {s: pipeline.counters(s) for s in STAGES}
    first_log = pipeline.output()
    pipeline.start()
    try:
        wait_for(lambda: flood_stored(pipeline) >= count,
                 f"{count} flooded destinations stored after the restart", timeout=timeout)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{shortfall(pipeline, count, before, first_log)}") from None
    wait_for(lambda: pipeline.counters("capture").get("journal_unstored") == 0,
             "the journal to hold nothing unstored", timeout=15)


def shortfall(pipeline: Pipeline, count: int, before: dict, first_log: str) -> str:
    """Which destinations are missing, what else the flood's rows became, and what each run
    counted and complained about: enough to tell where a record went."""
    stored = flood_rows(pipeline)
    expected = set(destinations(count, TARGETS, FIRST_PORT))
    missing = sorted(expected - set(stored))
    others = collections.Counter(
        (r["event_type"], r["dst_ip"]) for r in pipeline.rows()
        if r["event_type"] != "connection_blocked" or r["dst_ip"] not in TARGETS)
    complaints = [line for log in (first_log, pipeline.output()) for line in log.splitlines()
                  if any(word in line for word in ("WARNING", "ERROR", "rc="))
                  and "blocked destination" not in line]  # notify's alerts, one per row
    return "\n".join([
        f"{sum(stored.values())} stored; missing (first 20): {missing[:20]}",
        f"other rows: {dict(others)}",
        f"first run: {before}",
        f"second run: { {s: pipeline.counters(s) for s in STAGES} }",
        "log lines:", *complaints[-40:]])


def stage_pid(pipeline: Pipeline, stage: str) -> int:
    return int((pipeline.tmp / "run" / f"{stage}.ready").read_text().split("=")[1])


def finish(pipeline: Pipeline) -> None:
    pipeline.stop()
    detached = pipeline.sluice("detach", netns=True)
    assert detached.returncode == 0, detached.stderr


@pytest.fixture
def pipeline(lab, tmp_path):
    """Pins on this machine's bpffs, as on a real host: a crashed capture's ring buffer and
    maps are there for the next one. The socket hooks go on a cgroup of the test's own."""
    cgroup = cgroup2_mounts()[0] / f"sluice-t{lab.tag}"
    cgroup.mkdir()
    # The gateway's address resolved once and for all: a flood's first datagrams would wait
    # for ARP in a short queue, and those it overflows never reach the classifier at all.
    link = json.loads(subprocess.run(["ip", "-j", "-n", lab.server, "link", "show",
                                      lab.server_if], capture_output=True, text=True,
                                     check=True).stdout)
    subprocess.run(["ip", "-n", lab.client, "neigh", "replace", Lab.SERVER_V4, "lladdr",
                    link[0]["address"], "dev", lab.client_if, "nud", "permanent"], check=True)
    pipeline = Pipeline(lab, tmp_path, {"defaultAction": "deny"})
    pipeline.host_mounts = True
    pipeline.env.update(SLUICE_COUNTER_INTERVAL="0.2", SLUICE_CGROUP=str(cgroup))
    try:
        yield pipeline
    finally:
        if pipeline.proc is not None and pipeline.proc.poll() is None:
            pipeline.stop()
        pipeline.sluice("detach", netns=True)
        hooks = subprocess.run(["bpftool", "cgroup", "show", str(cgroup)], capture_output=True,
                               text=True).stdout
        cgroup.rmdir()
        assert "sluice" not in hooks, f"hooks left behind: {hooks}"
        assert not Path(pipeline.env["SLUICE_BPF_DIR"]).exists(), "pins left behind"


@pytest.mark.parametrize("stage", ["capture", "enrich", "policy", "persist"])
def test_kill_9_of_a_stage_in_a_flood_loses_and_repeats_nothing(lab, pipeline, stage):
    count = 20_000
    pipeline.start()
    flood = flooding(lab, count, per_second=8_000)
    wait_for(lambda: pipeline.counters("capture").get("records_read", 0) >= 3_000,
             "the flood to reach capture", timeout=30)
    os.kill(stage_pid(pipeline, stage), signal.SIGKILL)
    pipeline.proc.wait(20)  # honcho stops the other stages when one dies
    pipeline.log.close()
    assert f"{stage}.1 stopped (rc=-9)" in pipeline.output()
    flood_done(flood, count)

    restart_until_stored(pipeline, count)
    assert pipeline.counters("capture").get("kernel_lost", 0) == 0
    finish(pipeline)
    assert_each_stored_once(pipeline, count)


def test_a_stop_with_a_backlog_of_250000_records_loses_nothing(lab, pipeline):
    """persist is held (SIGSTOP) through the flood, so the stop comes with the whole flood
    still unstored: the pipeline now keeps up with this flood, and a stop that merely
    followed it found nothing left to lose. It stays held until policy has ended at the
    stop's 3 s limit: let go at once, it came to store all 250,000 within its own 3 s, and
    the stop had no backlog left. The next start stores the rest."""
    count = 250_000
    pipeline.start()
    persist, policy = stage_pid(pipeline, "persist"), stage_pid(pipeline, "policy")
    os.kill(persist, signal.SIGSTOP)
    try:
        flood_done(flooding(lab, count), count)
        pipeline.proc.send_signal(signal.SIGINT)  # with the backlog still in the pipeline
        wait_for(lambda: not Path(f"/proc/{policy}").exists(), "policy ended", timeout=4.5)
    finally:
        os.kill(persist, signal.SIGCONT)
    pipeline.proc.wait(15)
    pipeline.log.close()
    assert "SIGKILL" not in pipeline.output(), pipeline.output()[-3000:]
    first_run = flood_stored(pipeline)
    assert first_run < count, "no backlog at the stop: the test proves nothing"
    assert "stopped at the stop's 3 s limit" in pipeline.output()

    restart_until_stored(pipeline, count, timeout=180)
    capture = pipeline.counters("capture")
    assert capture["records_resent"] >= count - first_run
    finish(pipeline)
    assert_each_stored_once(pipeline, count)


def test_a_stop_right_after_a_burst_stores_everything_captured_before_the_stages_end(
        lab, pipeline):
    """The stages stop in the pipeline's order, each once its upstream has sent its last
    records: what capture claims at the stop (the second datagram of every flow, pending in
    its window) and the burst still on its way are stored before persist ends, so a CI runner
    thrown away after the stop keeps the whole burst. Before, each stage ended once its inbox
    was quiet for a moment, and those records waited in the journal for a next start."""
    count = 300  # a few blocks at a job's end: nothing else keeps the stages' inboxes busy
    pipeline.start()
    flood_done(flooding(lab, count, per_flow=2), 2 * count)
    rc = pipeline.stop()  # at once: the flows' second datagrams are still in their window
    assert set(rc.values()) == {"rc=0"} and len(rc) == 7, rc
    assert "stop's 3 s limit" not in pipeline.output(), "a stage ran out of the stop's time"
    journal = pipeline.tmp / "journal"
    assert unstored_records(journal) == 0, f"{unstored_records(journal)} records wait"
    rows = [r for r in pipeline.rows() if r["dst_ip"] in TARGETS]
    assert sum(r["packets"] for r in rows) == 2 * count
    assert len({(r["dst_ip"], r["dst_port"]) for r in rows}) == count
    assert pipeline.counters("capture")["flow_tails_reported"] > 0, "no tail claimed at the stop"
    assert len({r["event_id"] for r in rows}) == len(rows)
    lines = [line for line in pipeline.jsonl() if line.get("dst_ip") in TARGETS]
    assert sorted(line["event_id"] for line in lines) == sorted(r["event_id"] for r in rows)
    detached = pipeline.sluice("detach", netns=True)
    assert detached.returncode == 0, detached.stderr


def test_a_full_journal_is_counted_and_the_pipeline_keeps_enforcing(lab, pipeline):
    lab.start_server(80)
    pipeline.env["SLUICE_JOURNAL_MAX_BYTES"] = str(64 * 1024)  # about 700 records
    pipeline.start()
    count = 5_000
    flood_done(flooding(lab, count), count)
    wait_for(lambda: flood_stored(pipeline) >= count, "every record stored", timeout=60)
    capture = pipeline.counters("capture")
    assert capture["journal_full"] > 0 and capture.get("records_lost", 0) == 0
    assert "journal" in pipeline.output() and "is full" in pipeline.output()
    assert not lab.client_run("tcp", Lab.SERVER_V4, "80", "--timeout", "1")["ok"]
    finish(pipeline)
    assert_each_stored_once(pipeline, count)


def test_a_damaged_journal_is_skipped_with_a_warning_and_never_stored_twice(lab, pipeline):
    count = 3_000
    pipeline.start()
    flood_done(flooding(lab, count), count)
    wait_for(lambda: flood_stored(pipeline) >= count, "every record stored", timeout=60)
    finish(pipeline)
    journal = pipeline.tmp / "journal"
    segment = sorted(journal.glob("*.seg"))[-1]
    with open(segment, "ab") as f:
        f.write(b"\x10\x00\x00\x00garbage after the last frame")
    (journal / "acks").joinpath(f"{segment.stem}.ack").unlink(missing_ok=True)  # all unstored

    pipeline.start()
    wait_for(lambda: pipeline.counters("capture").get("journal_unstored") == 0,
             "the resent records to be acknowledged again", timeout=30)
    assert pipeline.counters("capture")["journal_damaged_bytes"] > 0
    assert "cut or corrupt" in pipeline.output()
    finish(pipeline)
    assert_each_stored_once(pipeline, count)


def test_a_journal_directory_that_cannot_be_used_never_stops_capture(lab, pipeline):
    (pipeline.tmp / "journal").write_text("a file where the directory should be")
    pipeline.start()
    count = 2_000
    flood_done(flooding(lab, count), count)
    wait_for(lambda: flood_stored(pipeline) >= count, "every record stored", timeout=60)
    assert pipeline.counters("capture")["journal_errors"] >= count
    assert "cannot use journal directory" in pipeline.output()
    finish(pipeline)
    assert_each_stored_once(pipeline, count)


def test_a_full_disk_under_the_journal_is_counted_and_nothing_waits_on_it(lab, pipeline):
    journal = pipeline.tmp / "journal"
    journal.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(journal)],
                   check=True)
    try:
        pipeline.start()
        count = 5_000
        # Paced, so capture drains many small frames and the disk fills partway through them:
        # sent at once, the whole flood could come in one drain, a frame larger than the
        # disk, and nothing would be journaled before the disk was full.
        flood_done(flooding(lab, count, per_second=2_000), count)
        wait_for(lambda: flood_stored(pipeline) >= count,
                 "every record stored", timeout=60)
        capture = pipeline.counters("capture")
        assert capture["journal_errors"] > 0 and capture["records_journaled"] > 0
        assert "No space left on device" in pipeline.output()
        finish(pipeline)
    finally:
        subprocess.run(["umount", str(journal)], check=True)
    assert_each_stored_once(pipeline, count)
