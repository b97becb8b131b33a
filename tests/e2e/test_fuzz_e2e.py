"""End to end: random and wrong-shaped frames at every inbox of a running pipeline (and
garbage at its DNS proxy), then it must still enforce, record a real connection and alert.

The real Procfile under honcho in a network namespace, enforce mode, a webhook sink; the
fuzzer (tests/support/tools/fuzzer.py) runs in the namespace. Every stage must still be up, every
rejection counted, and nothing real lost.
"""

import json
import subprocess

import pytest

from pipeline.topology import STAGES
from tests.support.netns import PYTHON, ROOT, Lab
from tests.support.pipeline import Pipeline, find
from tests.support.tools.httpsink import delivered
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
SINK_PORT = 18097
PER_INBOX = 300  # messages per inbox (the DNS proxy gets as many datagrams)


def test_a_fuzzed_pipeline_still_enforces_records_and_alerts(lab, tmp_path):
    lab.start_server(80, 443)
    record = tmp_path / "posts.jsonl"
    sink = subprocess.Popen(
        lab.exec_args(lab.client) + [PYTHON, "-m", "tests.support.tools.httpsink", "127.0.0.1",
                                     str(SINK_PORT), "--record", str(record)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lab.processes.append(sink)
    assert sink.stdout.readline().strip() == "ready"
    policy = {"defaultAction": "deny", "rules": [
        {"type": "cidr", "value": f"{Lab.SERVER_V4}/32", "action": "allow",
         "ports": [{"port": 80, "protocol": "tcp"}]}]}
    pipeline = Pipeline(lab, tmp_path, policy)
    pipeline.env.update(SLUICE_NOTIFY_URL=f"http://127.0.0.1:{SINK_PORT}/hook",
                        SLUICE_DNS_LISTEN="127.0.0.1:53", SLUICE_DNS_UPSTREAM=f"{Lab.SERVER_V4}:53")
    pipeline.start()

    fuzzed = subprocess.run(
        lab.exec_args(lab.client) + [PYTHON, "-m", "tests.support.tools.fuzzer",
                                     str(tmp_path / "run"), "--seed", "10", "--per-inbox",
                                     str(PER_INBOX), "--dns", "127.0.0.1:53"],
        cwd=ROOT, env=pipeline.env, capture_output=True, text=True, timeout=120)
    assert fuzzed.returncode == 0, fuzzed.stderr
    sent = json.loads(fuzzed.stdout)
    print("fuzz inputs:", json.dumps(sent))  # shown with -s; the counts the issue asks for
    assert sent["policy-allow"]["answered"] == PER_INBOX  # the REP inbox answered them all
    assert sent["policy-allow"]["rejected"] > 0

    # Every stage is still up, and every inbox counted what it rejected.
    ready = pipeline.sluice("wait-ready", "--timeout", "20", netns=True)
    assert ready.returncode == 0, ready.stderr + pipeline.output()
    for stage in ("enrich", "policy", "persist", "notify"):
        # Both counters, waited for: a stage's counters file is written on a timer, so one
        # snapshot can hold the rejected frames and not yet the rejected records after them.
        wait_for(lambda stage=stage: all(pipeline.counters(stage).get(name, 0) > 0
                                         for name in ("malformed_messages", "malformed_records")),
                 f"{stage} counting rejected frames and records", timeout=20)
    wait_for(lambda: pipeline.counters("dns").get("malformed", 0) > 0, "dns counting", timeout=10)

    # Still enforcing, still recording, still alerting.
    allowed = lab.client_run("tcp", Lab.SERVER_V4, "80", "--name", "sl-fuzz")
    blocked = lab.client_run("tcp", Lab.SERVER_V4, "443", "--timeout", "1", "--name", "sl-fuzz")
    assert allowed["ok"] and not blocked["ok"]
    wait_for(lambda: find(pipeline.jsonl(), process="sl-fuzz", dst_port=443)
             and find(pipeline.jsonl(), process="sl-fuzz", dst_port=80), "the records", timeout=15)
    wait_for(lambda: [b for b in delivered(record) if b.get("ip") == Lab.SERVER_V4
                      and b.get("port") == 443], "the alert for the real block", timeout=20)
    assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}
    assert pipeline.sluice("detach", netns=True).returncode == 0
    [allow] = find(pipeline.jsonl(), process="sl-fuzz", dst_port=80)
    [block] = find(pipeline.jsonl(), process="sl-fuzz", dst_port=443)[:1]
    assert (allow["event_type"], block["event_type"]) == ("connection_allowed",
                                                          "connection_blocked")
    assert block["pid"] == blocked["pid"] and block["blocked"] is True
    assert {row["event_id"] for row in pipeline.rows()} >= {allow["event_id"], block["event_id"]}
