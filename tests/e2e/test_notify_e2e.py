"""End to end: notify posts one alert per blocked destination, across a restart, through honcho."""

import subprocess

import pytest

from pipeline.topology import STAGES
from tests.support.netns import PYTHON, ROOT, Lab
from tests.support.pipeline import Pipeline
from tests.support.tools.httpsink import delivered, posts
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
TOKEN = "tok-e2e-5b1d-secret"
SINK_PORT = 18099
# Many connection attempts at once, each its own socket (its own flow, so its own record).
ATTEMPTS = r"""
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"sl-notify", 0, 0, 0)
held = []
for _ in range(int(sys.argv[3])):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((sys.argv[1], int(sys.argv[2])))
    held.append(s)
time.sleep(0.5)
"""


def attempt(lab: Lab, host: str, port: int, count: int) -> None:
    subprocess.run(lab.exec_args(lab.client) + [PYTHON, "-c", ATTEMPTS, host, str(port),
                                                str(count)], check=True, timeout=30)


def run_pipeline(lab, tmp_path, record, attempts, alerts) -> tuple[dict, str]:
    """Start the whole pipeline, make the attempts, wait for `alerts` delivered in all, stop;
    notify's final counters and honcho's output."""
    pipeline = Pipeline(lab, tmp_path, {"defaultAction": "deny"})
    pipeline.env.update(SLUICE_NOTIFY_URL=f"http://127.0.0.1:{SINK_PORT}/hook/secret-path",
                        SLUICE_NOTIFY_TOKEN=TOKEN)
    pipeline.start()
    for host, count in attempts:
        attempt(lab, host, 443, count)
    wait_for(lambda: len(delivered(record)) == alerts, f"{alerts} alert(s)", timeout=20)
    notices = sum(count for _, count in attempts)
    wait_for(lambda: pipeline.counters("notify").get("notices_received", 0) >= notices,
             "every notice counted", timeout=10)
    assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}
    assert pipeline.sluice("detach", netns=True).returncode == 0
    return pipeline.counters("notify"), pipeline.output()


def test_one_post_per_destination_with_retry_and_none_again_after_a_restart(lab, tmp_path):
    record = tmp_path / "posts.jsonl"
    sink = subprocess.Popen(  # in the client namespace, where notify runs
        lab.exec_args(lab.client) + [PYTHON, "-m", "tests.support.tools.httpsink", "127.0.0.1",
                                     str(SINK_PORT), "--record", str(record),
                                     "--fail-first", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lab.processes.append(sink)
    assert sink.stdout.readline().strip() == "ready"
    first, first_output = run_pipeline(lab, tmp_path, record,
                                       [(Lab.SERVER_V4, 50), ("10.202.0.4", 5)], alerts=2)
    assert first["duplicates_suppressed"] >= 53
    assert (first["delivered"], first["delivery_failures"], first["retries"]) == (2, 2, 2)
    # The whole pipeline again, on the same store: old destinations stay quiet.
    second, second_output = run_pipeline(lab, tmp_path, record,
                                         [(Lab.SERVER_V4, 10), ("10.202.0.5", 3)], alerts=3)
    assert second["delivered"] == 1 and second["duplicates_suppressed"] >= 12

    # The first run's two destinations are delivered in whichever order their retries fall
    # (the backoff is jittered, and the second block may come before the first's retry).
    got = [(b["ip"], b["port"], b["hostname"]) for b in delivered(record)]
    assert sorted(got[:2]) == [(Lab.SERVER_V4, 443, ""), ("10.202.0.4", 443, "")]
    assert got[2:] == [("10.202.0.5", 443, "")]
    assert [p["status"] for p in posts(record)] == [500, 500, 200, 200, 200]
    body = delivered(record)[0]
    assert (body["protocol"], body["process"], body["mode"], body["event_type"]) == (
        "TCP", "sl-notify", "enforce", "connection_blocked")
    assert all(p["headers"]["Authorization"] == f"Bearer {TOKEN}" for p in posts(record))

    # The token is in no output: logs, audit lines, counters, the store.
    assert "bearer token set" in first_output
    texts = [first_output, second_output, (tmp_path / "audit.jsonl").read_text()]
    texts += [path.read_text() for path in (tmp_path / "run").glob("*.counters.json")]
    assert not [text for text in texts if TOKEN in text or "secret-path" in text]
    for path in tmp_path.glob("audit.db*"):
        assert TOKEN.encode() not in path.read_bytes()
