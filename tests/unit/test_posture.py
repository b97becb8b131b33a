"""The posture: how layer reports, failures and leftovers combine, what a stage writes, and
what `sluice status` and `sluice wait-ready` make of it."""

import json
import os

import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.posture import (LAYERS, StageState, classifier_report, combine, hooks_report,
                              ipv6_report, read_posture)
from pipeline.rulemaps import DictRuleMaps
from pipeline.stages.policy import PolicyStage
from pipeline.topology import STAGES
from tests.support.stagekit import StageThread, stage_settings
from tests.support.wait import wait_for

runner = CliRunner()
ON = {"state": "on", "requested": True, "detail": "fine"}


def stages(**states):
    return {name: StageState(name, states.get(name, "ready"), 1, "", {}) for name in STAGES}


def everything_on():
    reports = {spec.name: (spec.stage, dict(ON)) for spec in LAYERS}
    reports["ring_buffer"] = ("capture", {**ON, "kernel_reserve_failures": 0})
    return reports


def test_every_layer_is_listed_in_order_and_all_on_means_no_problem():
    posture = combine(everything_on(), stages(), {}, {"capture": {}}, None)
    assert list(posture.layers) == [spec.name for spec in LAYERS]
    assert posture.problems() == [] and posture.as_json()["ready"] is True


@pytest.mark.parametrize("report, problem", [
    ({"state": "failed", "detail": "the kernel's maps say audit mode, enforce was requested"},
     "layer classifier is failed: the kernel's maps say audit mode, enforce was requested"),
    ({"state": "pending", "detail": "waiting"}, "layer classifier is pending: waiting"),
    ({"state": "sideways", "detail": "?"}, "layer classifier is failed: ?"),
])
def test_a_requested_layer_that_is_not_on_is_a_problem(report, problem):
    reports = everything_on()
    reports["classifier"] = ("capture", {"requested": True, **report})
    posture = combine(reports, stages(), {}, {"capture": {}}, None)
    assert posture.problems() == [problem]
    assert posture.problems({"dns"}) == [], "only the layers of the stages asked about"


def test_a_layer_not_requested_is_no_problem_and_one_nobody_reports_is():
    reports = everything_on()
    reports["dns_redirect"] = ("dns", {"state": "off", "requested": False, "detail": "off"})
    del reports["dns_proxy"]
    posture = combine(reports, stages(dns="down"), {}, {"capture": {}}, None)
    assert posture.problems() == ["layer dns_proxy is down: stage dns is not running"]


def test_a_failed_stage_takes_its_layers_with_it():
    posture = combine({}, stages(capture="failed"), {"dns_redirect": False}, {}, None)
    assert posture.layers["classifier"].state == "failed"
    assert posture.layers["policy"].state == "pending"
    assert posture.layers["dns_redirect"].state == "off"


def test_a_filter_left_attached_without_capture_is_stale_not_on():
    attachment = {"interface": "eth9", "filter_attached": True}
    posture = combine({}, stages(capture="down"), {}, {}, attachment)
    layer = posture.layers["classifier"]
    assert layer.state == "stale" and "eth9" in layer.detail and "sluice detach" in layer.detail


def test_ring_buffer_loss_is_shown_but_never_blocks_readiness():
    counters = {"capture": {"kernel_ringbuf_full": 3, "enrich_dropped": 0},
                "enrich": {"policy_dropped": 5}}
    reports = everything_on()
    reports["ring_buffer"] = ("capture", {**ON, "kernel_reserve_failures": 3})
    posture = combine(reports, stages(), {}, counters, None)
    layer = posture.layers["ring_buffer"]
    assert layer.state == "partial" and layer.facts["kernel_reserve_failures"] == 3
    assert layer.facts["dropped_between_stages"] == {"enrich.policy_dropped": 5}
    assert posture.problems() == []


@pytest.mark.parametrize("attached, config, state", [
    (True, ("deny", "enforce", 4), "on"),
    (False, ("deny", "enforce", 0), "pending"),
    (True, ("deny", "audit", 4), "failed"),   # never silently audit when enforce was asked
    (True, None, "pending"),
])
def test_classifier_report(attached, config, state):
    report = classifier_report("eth0", "enforce", attached, config)
    assert report["state"] == state and report["direction"] == "egress"
    if state == "on":
        assert (report["mode"], report["default_action"], report["policy_generation"]) == (
            "enforce", "deny", 4)


def test_hooks_and_ipv6_reports():
    assert hooks_report("/sys/fs/cgroup", 4, 4)["state"] == "on"
    assert hooks_report("/sys/fs/cgroup", 2, 4)["state"] == "partial"
    assert hooks_report("/sys/fs/cgroup", 0, 4)["state"] == "failed"
    assert ipv6_report("eth0", False, 2)["state"] == "on"
    assert ipv6_report("eth0", False, 1)["state"] == "partial"
    assert ipv6_report("eth0", True, 0)["detail"] == "IPv6 is disabled on eth0"


def write_layers(run_dir, stage, pid, layers):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{stage}.layers.json").write_text(json.dumps(
        {"stage": stage, "pid": pid, "time": 0, "layers": layers}))


def test_reports_of_dead_stages_are_not_trusted(tmp_path):
    settings = stage_settings(tmp_path)
    write_layers(settings.run_dir, "dns", 2 ** 22 + 12345, {"dns_proxy": ON})  # no such pid
    posture = read_posture(settings, STAGES)
    assert posture.layers["dns_proxy"].state == "down"
    write_layers(settings.run_dir, "dns", os.getpid(), {"dns_proxy": ON})
    assert read_posture(settings, STAGES).layers["dns_proxy"].state == "on"


def test_the_policy_stage_reports_its_layer_and_removes_it_when_it_stops(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text('{"defaultAction": "deny"}')
    settings = stage_settings(tmp_path, SLUICE_POLICY=str(policy),
                              SLUICE_ALLOW_EXISTING_CONNECTIONS="false", GITHUB_ACTIONS="true")
    stage = StageThread(PolicyStage(open_maps=lambda s: DictRuleMaps()), settings).start()
    layer = wait_for(lambda: read_posture(settings, STAGES).layers["policy"].state == "on"
                     and read_posture(settings, STAGES).layers["policy"], "policy layer on")
    assert layer.facts["generation"] == 1 and layer.facts["default_action"] == "deny"
    assert layer.facts["auto_allowed"]["github_service"] == 5
    assert "auto-allowed:" in layer.detail and "github_service" in layer.detail
    assert stage.finish() == 0
    assert not (settings.run_dir / "policy.layers.json").exists()


def test_status_json_and_table(tmp_path):
    settings = stage_settings(tmp_path)
    for spec in LAYERS:
        write_layers(settings.run_dir, spec.name, os.getpid(),
                     {spec.name: {**ON, "kernel_reserve_failures": 0}})
    env = {"SLUICE_RUN_DIR": str(settings.run_dir)}
    result = runner.invoke(app, ["status", "--json"], env=env)
    data = json.loads(result.output)
    assert result.exit_code == 0 and data["problems"] == []
    assert list(data["layers"]) == [spec.name for spec in LAYERS]
    assert data["layers"]["ring_buffer"]["kernel_reserve_failures"] == 0
    assert data["ready"] is False, "no stage is marked ready"
    table = runner.invoke(app, ["status"], env=env).output.splitlines()
    assert table[0].split() == ["layer", "state", "detail"]
    assert table[1].split()[:3] == ["classifier", "on", "fine"]

    write_layers(settings.run_dir, "dns_proxy", os.getpid(), {"dns_proxy": {
        "state": "failed", "requested": True, "detail": "cannot listen on 127.0.0.1:53"}})
    result = runner.invoke(app, ["status"], env=env)
    assert result.exit_code == 1
    assert "NOT FULLY ON: layer dns_proxy is failed: cannot listen on 127.0.0.1:53" in result.output
    waited = runner.invoke(app, ["wait-ready", "--timeout", "5"], env=env)
    assert waited.exit_code == 3
    assert "layer dns_proxy is failed: cannot listen on 127.0.0.1:53" in waited.output


def test_wait_ready_names_the_layers_of_a_failed_stage(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "capture.failed").write_text("no interface named 'nope0' (SLUICE_INTERFACE)\n")
    result = runner.invoke(app, ["wait-ready", "--timeout", "5"],
                           env={"SLUICE_RUN_DIR": str(run_dir)})
    assert result.exit_code == 3
    assert result.output.strip() == (
        "sluice: layer classifier, cgroup_hooks, ipv6, dns_redirect not on: stage capture "
        "failed: no interface named 'nope0' (SLUICE_INTERFACE)")


def test_records_the_full_ring_buffer_parked_are_not_a_loss():
    reports = everything_on()
    reports["ring_buffer"] = ("capture", {**ON, "kernel_reserve_failures": 40,
                                          "kernel_lost_packets": 0, "records_lost": 0})
    layer = combine(reports, stages(), {}, {}, None).layers["ring_buffer"]
    assert layer.state == "on" and "40 record(s)" in layer.detail and "parked" in layer.detail
    reports["ring_buffer"][1]["kernel_lost_packets"] = 2
    layer = combine(reports, stages(), {}, {}, None).layers["ring_buffer"]
    assert layer.state == "partial" and "2 packet(s) the kernel could not park" in layer.detail


def test_packets_evicted_with_their_flow_are_a_loss():
    reports = everything_on()
    reports["ring_buffer"] = ("capture", {**ON, "kernel_reserve_failures": 0,
                                          "kernel_lost_packets": 0, "records_lost": 0,
                                          "kernel_evicted_packets": 3})
    layer = combine(reports, stages(), {}, {}, None).layers["ring_buffer"]
    assert layer.state == "partial"
    assert "3 evicted with their flow before being reported" in layer.detail
