"""End to end: the real Procfile under `honcho start` inside a network namespace."""

import json
from pathlib import Path

import pytest

from pipeline.topology import STAGES
from tests.support.netns import Lab, Session, sh
from tests.support.pipeline import Pipeline, attached_cgroup_prog_ids, find
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


def test_pipeline_judges_real_connections_and_stores_agreeing_jsonl_and_sql(lab, tmp_path):
    lab.start_server(80, 443)
    policy = {"defaultAction": "deny", "rules": [
        {"type": "cidr", "value": f"{Lab.SERVER_V4}/32", "action": "allow",
         "ports": [{"port": 80, "protocol": "tcp"}]}]}
    pipeline = Pipeline(lab, tmp_path, policy).start()
    hooks = pipeline.hook_ids()

    allowed = lab.client_run("tcp", Lab.SERVER_V4, "80", "--name", "sl-e2e")
    blocked = lab.client_run("tcp", Lab.SERVER_V4, "443", "--timeout", "1", "--name", "sl-e2e")
    lab.client_run("raw", Lab.SERVER_V4, "47")
    assert allowed["ok"] and not blocked["ok"]

    wait_for(lambda: find(pipeline.jsonl(), event_type="protocol_blocked")
             and find(pipeline.jsonl(), dst_port=443), "records in the JSONL file", timeout=15)
    assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}
    lines, rows = pipeline.jsonl(), pipeline.rows()

    [ok] = find(lines, event_type="connection_allowed", dst_port=80)
    assert (ok["dst_ip"], ok["protocol"], ok["process"], ok["pid"]) == (
        Lab.SERVER_V4, "TCP", "sl-e2e", allowed["pid"])
    assert ok["would_deny"] is False and ok["blocked"] is False and ok["host"] == "e2e-host"
    block = find(lines, event_type="connection_blocked", dst_port=443)[0]
    assert (block["blocked"], block["would_deny"], block["pid"]) == (True, False, blocked["pid"])
    [gre] = find(lines, event_type="protocol_blocked")[:1]
    assert gre["protocol"] == "GRE" and "dst_port" not in gre and gre["blocked"] is True

    # Every JSONL line has its row, field by field, and nothing else is stored.
    assert len(rows) == len(lines)
    by_id = {r["event_id"]: r for r in rows}
    for line in lines:
        row = by_id[line["event_id"]]
        for field in ("event_type", "src_ip", "dst_ip", "dst_hostname", "protocol", "process",
                      "matched_rule", "auto_allowed_type", "host"):
            assert (row[field] or "") == line.get(field, ""), field
        for field in ("dst_port", "pid"):
            assert (row[field] or 0) == line.get(field, 0), field
        for field in ("would_deny", "blocked", "mid_stream"):
            assert bool(row[field]) == line.get(field, False), field

    # Enforce mode: the filter stays after a stop (fail closed) until `sluice detach`.
    filters = sh(*lab.exec_args(lab.client), "tc", "filter", "show", "dev", lab.client_if,
                 "egress").stdout
    assert "sluice_egress" in filters
    detached = pipeline.sluice("detach", netns=True)
    assert detached.returncode == 0, detached.stderr
    assert "sluice_egress" not in sh(*lab.exec_args(lab.client), "tc", "filter", "show", "dev",
                                     lab.client_if, "egress").stdout
    run_dir = tmp_path / "run"
    assert not list(run_dir.glob("*.sock")), "sockets left behind"
    assert not list(run_dir.glob("*.ready"))
    assert not (run_dir / "attachment.json").exists()
    assert not Path(f"/sys/fs/bpf/sluice-e{lab.tag}").exists()
    assert not hooks & attached_cgroup_prog_ids()


def test_audit_mode_reports_would_deny_and_a_clean_stop_detaches(lab, tmp_path):
    lab.start_server(443)
    pipeline = Pipeline(lab, tmp_path, {"defaultAction": "deny"}, mode="audit").start()
    hooks = pipeline.hook_ids()
    assert len(hooks) == 9 and hooks <= attached_cgroup_prog_ids()
    result = lab.client_run("tcp", Lab.SERVER_V4, "443", "--name", "sl-audit")
    assert result["ok"], "audit mode must not drop"
    wait_for(lambda: find(pipeline.jsonl(), dst_port=443), "the would-deny record", timeout=15)
    assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}
    records = find(pipeline.jsonl(), event_type="connection_blocked", dst_port=443)
    # The SYN, then (the connection proceeding) its would-be-dropped mid-stream segments.
    assert [r.get("mid_stream", False) for r in records][:1] == [False]
    for record in records:
        assert (record["would_deny"], record["blocked"], record["process"]) == (
            True, False, "sl-audit")
    # No `sluice detach`: in audit mode the stop itself leaves the host as it was.
    assert "sluice_egress" not in sh(*lab.exec_args(lab.client), "tc", "filter", "show", "dev",
                                     lab.client_if, "egress").stdout
    assert "clsact" not in sh(*lab.exec_args(lab.client), "tc", "qdisc", "show", "dev",
                              lab.client_if).stdout
    assert not (tmp_path / "run" / "attachment.json").exists()
    assert not hooks & attached_cgroup_prog_ids()


def test_two_instances_run_side_by_side(tmp_path, kernel):
    labs = [Lab(), Lab()]
    try:
        pipelines = []
        for index, lab in enumerate(labs):
            lab.create()
            lab.start_server(80)
            policy = {"defaultAction": "deny", "rules": [
                {"type": "cidr", "value": f"{Lab.SERVER_V4}/32", "action": "allow"}]}
            (tmp_path / str(index)).mkdir()
            pipelines.append(Pipeline(lab, tmp_path / str(index), policy).start())
        for lab in labs:
            assert lab.client_run("tcp", Lab.SERVER_V4, "80")["ok"]
        for pipeline in pipelines:
            wait_for(lambda pipeline=pipeline: find(pipeline.jsonl(), dst_port=80),
                     "each instance's record", timeout=15)
            assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}
            assert pipeline.sluice("detach", netns=True).returncode == 0
            assert len(find(pipeline.jsonl(), event_type="connection_allowed")) == 1
    finally:
        for lab in labs:
            lab.close()


def test_policy_reload_by_diff_cuts_removed_rules_and_keeps_the_rest(lab, tmp_path):
    lab.start_server(80, 443)
    keep = {"type": "cidr", "value": f"{Lab.SERVER_V4}/32", "action": "allow",
            "ports": [{"port": 80, "protocol": "tcp"}]}
    dropped = {"type": "cidr", "value": Lab.SUBNET, "action": "allow",
               "ports": [{"port": 443, "protocol": "tcp"}]}
    pipeline = Pipeline(lab, tmp_path, {"defaultAction": "deny", "rules": [keep, dropped]}).start()
    held = Session(lab, Lab.SERVER_V4, 80)
    assert held.opened["ok"] and held.ping()
    assert lab.client_run("tcp", "10.202.0.3", "443")["ok"]

    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"defaultAction": "deny", "rules": [keep]}))
    wait_for(lambda: pipeline.reloaded("policy_reloads"), "the reload", timeout=10)
    assert not lab.client_run("tcp", "10.202.0.3", "443", "--timeout", "1")["ok"]
    assert held.ping(), "a connection allowed by both policies must keep working"
    assert lab.client_run("tcp", Lab.SERVER_V4, "80")["ok"]

    policy_file.write_text("{ this is not json")
    wait_for(lambda: pipeline.reloaded("policy_reload_failures"), "the refused reload", timeout=10)
    assert held.ping() and lab.client_run("tcp", Lab.SERVER_V4, "80")["ok"]
    assert not lab.client_run("tcp", "10.202.0.3", "443", "--timeout", "1")["ok"]
    assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}
    assert pipeline.sluice("detach", netns=True).returncode == 0


def test_connections_open_before_start_keep_working_and_are_recorded(lab, tmp_path):
    lab.start_server(80)
    held = Session(lab, Lab.SERVER_V4, 80)
    assert held.opened["ok"]
    pipeline = Pipeline(lab, tmp_path, {"defaultAction": "deny"}).start()
    assert held.ping(), "an existing connection must not be cut at attach"
    assert not lab.client_run("tcp", Lab.SERVER_V4, "81", "--timeout", "1")["ok"]
    wait_for(lambda: find(pipeline.jsonl(), event_type="existing_connection"),
             "the record", timeout=10)
    assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}
    [record] = find(pipeline.jsonl(), event_type="existing_connection", dst_ip=Lab.SERVER_V4)
    assert (record["would_deny"], record["blocked"]) == (False, False)
    assert pipeline.sluice("detach", netns=True).returncode == 0
