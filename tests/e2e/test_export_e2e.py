"""End to end: the real Procfile exports what it stores to a collector and syslog, and its
/metrics agree with `sluice status`."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.topology import STAGES
from tests.support.exportkit import SyslogListener, parse_syslog
from tests.support.netns import PYTHON, ROOT, Lab
from tests.support.pipeline import Pipeline, find
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
METRICS = "127.0.0.1:9464"


def start_collector(lab: Lab, record) -> None:
    proc = subprocess.Popen(lab.exec_args(lab.client) + [
        PYTHON, "-m", "tests.support.tools.otlpreceiver", "127.0.0.1", "4318", "--record",
        str(record)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lab.processes.append(proc)
    assert proc.stdout.readline().strip() == "ready"


def scrape(lab: Lab) -> dict:
    """name -> value of every sample without labels; labelled ones keyed (name, labels)."""
    text = subprocess.run(lab.exec_args(lab.client) + [
        PYTHON, "-c", "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
        f"'http://{METRICS}/metrics', timeout=5).read().decode())"],
        capture_output=True, text=True, check=True, timeout=20).stdout
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items()))) if sample.labels \
                else sample.name
            out[key] = sample.value
    return out


def status(pipeline: Pipeline) -> dict:
    result = pipeline.sluice("status", "--json")
    return json.loads(result.stdout)["stages"]


def quiet_snapshot(lab: Lab, pipeline: Pipeline) -> tuple[dict, dict]:
    """A scrape and a status taken while nothing changed in between (bounded retries)."""
    for _ in range(20):
        before = scrape(lab)
        stages = status(pipeline)
        after = scrape(lab)
        if before == after:
            return after, stages
        time.sleep(0.5)
    raise AssertionError("the counters never stood still for a scrape")


def test_the_pipeline_exports_every_record_and_its_metrics_match_status(lab, tmp_path):
    lab.start_server(80, 443)
    collected = tmp_path / "collected.ndjson"
    start_collector(lab, collected)
    syslog = SyslogListener("unix", tmp_path)
    policy = {"defaultAction": "deny", "rules": [
        {"type": "cidr", "value": f"{Lab.SERVER_V4}/32", "action": "allow",
         "ports": [{"port": 80, "protocol": "tcp"}]}]}
    pipeline = Pipeline(lab, tmp_path, policy)
    pipeline.env.update(SLUICE_OTLP_ENDPOINT="http://127.0.0.1:4318",
                        SLUICE_METRICS_LISTEN=METRICS, SLUICE_SYSLOG=syslog.target)
    try:
        pipeline.start()
        for _ in range(3):
            assert lab.client_run("tcp", Lab.SERVER_V4, "80", "--name", "sl-exp")["ok"]
            assert not lab.client_run("tcp", Lab.SERVER_V4, "443", "--timeout", "1",
                                      "--name", "sl-exp")["ok"]
        lab.client_run("raw", Lab.SERVER_V4, "47")
        wait_for(lambda: find(pipeline.rows(), event_type="protocol_blocked"),
                 "the rows", timeout=15)

        def exported() -> list[dict]:
            text = collected.read_text() if collected.exists() else ""
            return [json.loads(line) for line in text.splitlines()]

        wait_for(lambda: len(exported()) == len(pipeline.rows()), "every row exported", timeout=20)
        # The backlog is a level export recounts every BACKLOG_EVERY_S, so it may trail, and
        # a row can still come late (a refused flow's retransmitted SYN is its tail, claimed
        # a second after its last packet, or at the stop): the snapshot compared is a quiet
        # one whose backlog has been recounted to 0 and whose rows stood still around it.
        def drained() -> tuple[dict, dict, list[dict]] | None:
            rows = pipeline.rows()
            metrics, stages = quiet_snapshot(lab, pipeline)
            settled = (metrics.get("sluice_export_otlp_backlog") == 0
                       and metrics.get("sluice_export_otlp_exported_total") == len(rows)
                       and len(pipeline.rows()) == len(rows))
            return (metrics, stages, rows) if settled else None

        metrics, stages, rows = wait_for(drained, "a quiet snapshot with no backlog left",
                                         timeout=20)
        assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}
        stored = {r["event_id"]: r for r in pipeline.rows()}  # a late row may be among them
    finally:
        syslog.close()
        pipeline.sluice("detach", netns=True)

    # Every row of the snapshot arrived once, with its fields, and nothing that is not stored.
    records = {r["attributes"]["event_id"]: r for r in exported()}
    assert len(records) == len(exported())
    assert {r["event_id"] for r in rows} <= set(records) <= set(stored)
    for event_id, record in records.items():
        row = stored[event_id]
        assert record["body"] == row["event_type"]
        for field in ("dst_ip", "protocol", "process", "host"):
            assert record["attributes"].get(field, "") == row[field], field
        assert record["attributes"]["blocked"] == bool(row["blocked"])
        assert record["resource"]["host.name"] == "e2e-host"

    # One RFC 5424 message per blocked record, in the store's order (a late one may follow).
    blocked = [r["event_id"] for r in stored.values() if r["blocked"]]
    messages = [parse_syslog(line) for line in syslog.lines]
    sent = [m["params"]["event_id"] for m in messages]
    assert sent == blocked[:len(sent)] and len(sent) >= sum(r["blocked"] for r in rows)
    assert {m["msgid"] for m in messages} == {"connection_blocked", "protocol_blocked"}

    # /metrics shows what `sluice status` shows, counter for counter.
    compared = 0
    for stage, state in stages.items():
        assert metrics[("sluice_stage_up", (("stage", stage),))] == 1
        for name, value in state["counters"].items():
            gauge = f"sluice_{stage}_{name}"
            assert metrics.get(f"{gauge}_total", metrics.get(gauge)) == value, gauge
            compared += 1
    assert compared > 20
    assert metrics["sluice_export_otlp_backlog"] == 0
    assert metrics["sluice_export_otlp_exported_total"] == len(rows)
    per_cpu = sum(v for k, v in metrics.items()
                  if isinstance(k, tuple) and k[0] == "sluice_kernel_denied_total")
    assert per_cpu >= stages["capture"]["counters"]["kernel_denied"] > 0
    assert "sluice_ringbuf_lost_total" in metrics
    assert "sluice_dns_answer_latency_seconds_count" in metrics
    assert "sluice_dns_allow_round_trip_seconds_count" in metrics
    assert "sluice_dns_upstream_round_trip_seconds_count" in metrics
