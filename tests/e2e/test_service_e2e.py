"""End to end: `sluice up` / `sluice down` in a network namespace, a requested layer that
fails at start, and the GitHub Action's steps run as a script in a fake Actions environment.

Every sluice command runs with `nsenter --net` into the lab's client namespace (this mount
namespace, so the test sees the pins), as a CI step would run it on the runner itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.dns.endpoints import REDIRECT_V4
from tests.support.netns import ROOT, Lab, LabCgroup, base_env, sh
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
VENV_BIN = Path(sys.executable).parent
ALLOW_80 = {"defaultAction": "deny", "rules": [
    {"type": "cidr", "value": f"{Lab.SERVER_V4}/32", "action": "allow",
     "ports": [{"port": 80, "protocol": "tcp"}]}]}


class Service:
    """What a runner's job has: the settings of one sluice, and a shell in the namespace."""

    def __init__(self, lab: Lab, tmp_path: Path, policy: dict | None = None, **env: str) -> None:
        self.lab, self.tmp = lab, tmp_path
        self.run_dir = tmp_path / "run"
        self.bpf_dir = Path(f"/sys/fs/bpf/sluice-u{lab.tag}")
        self.env = base_env(**{
            "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "SLUICE_MODE": "enforce",
            "SLUICE_INTERFACE": lab.client_if, "SLUICE_RUN_DIR": str(self.run_dir),
            "SLUICE_BPF_DIR": str(self.bpf_dir), "SLUICE_DB": f"sqlite:///{tmp_path}/audit.db",
            "SLUICE_AUDIT_LOG": str(tmp_path / "audit.jsonl"), "SLUICE_HOST": "svc-host",
            "SLUICE_JOURNAL_DIR": str(tmp_path / "journal"),
            "SLUICE_COUNTER_INTERVAL": "1", "SLUICE_DNS_UPSTREAM": f"{Lab.SERVER_V4}:53",
            "SLUICE_CGROUP": str(lab.cgroup.path), **env})
        for name in [k for k in self.env if k.startswith(("GITHUB_", "GITLAB_", "ACTIONS_"))]:
            del self.env[name]
        if policy is not None:
            (tmp_path / "policy.json").write_text(json.dumps(policy))
            self.env["SLUICE_POLICY"] = str(tmp_path / "policy.json")

    def in_ns(self, args: list[str]) -> list[str]:
        """In the lab's namespace and test cgroup, where the hooks are."""
        return ["nsenter", f"--net=/run/netns/{self.lab.client}",
                *LabCgroup.run_in(self.lab.cgroup.leaf), *args]

    def sluice(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        return subprocess.run(self.in_ns([str(VENV_BIN / "sluice"), *args]), env=self.env,
                              cwd=self.tmp, capture_output=True, text=True, timeout=timeout)

    def jsonl(self) -> list[dict]:
        path = self.tmp / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def filter_attached(self) -> bool:
        out = sh(*self.lab.exec_args(self.lab.client), "tc", "filter", "show", "dev",
                 self.lab.client_if, "egress").stdout
        return "sluice_egress" in out


def processes_of(run_dir: Path) -> list[int]:
    """Every process whose environment names this run dir (honcho and the stages)."""
    marker = f"SLUICE_RUN_DIR={run_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def attached_hook_ids() -> set[str]:
    out = sh("bpftool", "cgroup", "tree", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()}


def hook_ids(run_dir: Path) -> set[str]:
    try:
        record = json.loads((run_dir / "attachment.json").read_text())
    except (OSError, ValueError):
        return set()
    return {str(hook["prog_id"]) for hook in record["hooks"]}


def assert_nothing_left(service: Service, hooks: set[str]) -> None:
    assert processes_of(service.run_dir) == [], "a process of the pipeline is still running"
    assert not service.filter_attached()
    assert not service.bpf_dir.exists(), "pinned maps left behind"
    assert not hooks & attached_hook_ids(), "cgroup hooks left attached"
    loopback = sh("ip", "-n", service.lab.client, "address", "show", "dev", "lo").stdout
    assert REDIRECT_V4 not in loopback, "the DNS redirect's address left on lo"
    for name in ("sluice.json", "sluice.pid", "attachment.json"):
        assert not (service.run_dir / name).exists(), name


# ------------------------------------------------------------------ up and down


def test_up_down_in_a_namespace(lab, tmp_path):
    lab.start_server(80, 443)
    service = Service(lab, tmp_path, ALLOW_80)
    up = service.sluice("up")
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith(f"sluice is up: {lab.client_if} egress, enforce mode, default "
                                "deny, policy generation 1; pid ")
    hooks = hook_ids(service.run_dir)
    assert len(hooks) == 9 and hooks <= attached_hook_ids()

    again = service.sluice("up")
    assert again.returncode == 1
    [line] = again.stderr.splitlines()
    assert line.startswith("sluice: already running (pid ") and "`sluice down` stops it" in line

    status = service.sluice("status", "--json")
    assert status.returncode == 0, status.stdout
    posture = json.loads(status.stdout)
    assert posture["ready"] and posture["problems"] == []
    layers = posture["layers"]
    assert {k: v["state"] for k, v in layers.items()} == {
        "classifier": "on", "cgroup_hooks": "on", "ipv6": "on", "policy": "on",
        "dns_proxy": "on", "dns_redirect": "on", "ring_buffer": "on"}
    assert (layers["classifier"]["interface"], layers["classifier"]["direction"],
            layers["classifier"]["mode"], layers["classifier"]["default_action"],
            layers["classifier"]["policy_generation"]) == (
        lab.client_if, "egress", "enforce", "deny", 1)
    assert layers["dns_proxy"]["listen"] == ["127.0.0.1:53"]
    assert layers["ring_buffer"]["kernel_reserve_failures"] == 0

    assert lab.client_run("tcp", Lab.SERVER_V4, "80", "--name", "sl-up")["ok"]
    assert not lab.client_run("tcp", Lab.SERVER_V4, "443", "--timeout", "1")["ok"]
    wait_for(lambda: {r.get("dst_port") for r in service.jsonl()} >= {80, 443},
             "both connections recorded", timeout=15)

    # --keep-filter: everything stops, enforcement stays (fail closed) ...
    kept = service.sluice("down", "--keep-filter")
    assert kept.returncode == 0, kept.stderr
    assert "the filter stays in place (--keep-filter)" in kept.stderr
    assert "report: 1 destination(s) blocked" in kept.stderr
    assert processes_of(service.run_dir) == []
    assert service.filter_attached() and service.bpf_dir.exists()
    assert not lab.client_run("tcp", Lab.SERVER_V4, "443", "--timeout", "1")["ok"]
    stale = service.sluice("status", "--json")
    assert stale.returncode == 1
    assert json.loads(stale.stdout)["layers"]["classifier"]["state"] == "stale"

    # ... and a plain down removes what is left, then has nothing more to do.
    down = service.sluice("down")
    assert down.returncode == 0, down.stderr
    assert down.stderr.startswith("sluice is not running; removed filter sluice_egress on ")
    assert_nothing_left(service, hooks)
    assert lab.client_run("tcp", Lab.SERVER_V4, "443")["ok"], "nothing filters any more"
    idle = service.sluice("down")
    assert (idle.returncode, idle.stderr) == (0, "sluice is not running\n")


def _up_in_background(service: Service) -> tuple[subprocess.Popen, set[str]]:
    """Start `sluice up` and collect the hook ids capture attaches while it runs."""
    proc = subprocess.Popen(service.in_ns([str(VENV_BIN / "sluice"), "up", "--timeout", "60"]),
                            env=service.env, cwd=service.tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    hooks: set[str] = set()
    while proc.poll() is None:
        hooks |= hook_ids(service.run_dir)
        time.sleep(0.02)
    return proc, hooks


def test_up_fails_naming_a_missing_interface_and_leaves_nothing(lab, tmp_path):
    service = Service(lab, tmp_path, ALLOW_80, SLUICE_INTERFACE="nope0")
    proc, hooks = _up_in_background(service)
    stderr = proc.stderr.read()
    assert proc.returncode == 3, stderr
    first = stderr.splitlines()[0]
    assert first.startswith("sluice: layer classifier, cgroup_hooks, ipv6, dns_redirect not "
                            "on: stage capture failed: no interface named 'nope0' "
                            "(SLUICE_INTERFACE)")
    assert f"--- the last lines of {service.run_dir}/sluice.log ---" in stderr
    assert "capture.1" in stderr, "the log's tail shows honcho's lines"
    assert_nothing_left(service, hooks)


def test_up_fails_naming_the_dns_proxy_when_its_port_is_taken(lab, tmp_path):
    holder = subprocess.Popen(
        lab.exec_args(lab.client) + [sys.executable, "-c",
                                     "import socket, sys; s = socket.socket(socket.AF_INET, "
                                     "socket.SOCK_DGRAM); s.bind(('127.0.0.1', 53)); "
                                     "print('bound', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.processes.append(holder)
    assert holder.stdout.readline().strip() == "bound"
    service = Service(lab, tmp_path, ALLOW_80)
    proc, hooks = _up_in_background(service)
    stderr = proc.stderr.read()
    assert proc.returncode == 3, stderr
    assert stderr.startswith("sluice: layer dns_proxy not on: stage dns failed: cannot listen "
                             "on 127.0.0.1:53/udp: Address already in use")
    assert_nothing_left(service, hooks)


# ------------------------------------------------------------------ the GitHub Action


class FakeActions:
    """Runs workflow steps as the runner would: bash, the step's env with `${{ inputs.x }}`
    filled in, GITHUB_ENV / GITHUB_PATH lines carried to later steps, GITHUB_OUTPUT and
    GITHUB_STEP_SUMMARY files, all inside the lab's client namespace."""

    def __init__(self, service: Service, tmp_path: Path) -> None:
        self.service = service
        self.dir = tmp_path / "actions"
        self.dir.mkdir()
        self.files = {name: self.dir / name.lower() for name in
                      ("GITHUB_ENV", "GITHUB_PATH", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY")}
        for path in self.files.values():
            path.write_text("")
        (self.dir / "temp").mkdir()
        self.env = {**service.env, "GITHUB_ACTIONS": "true", "CI": "true",
                    "GITHUB_ACTION_PATH": str(ROOT), "RUNNER_TEMP": str(self.dir / "temp"),
                    **{name: str(path) for name, path in self.files.items()}}

    def run(self, step: dict, inputs: dict) -> subprocess.CompletedProcess:
        env = dict(self.env)
        for key, value in (step.get("env") or {}).items():
            expression = re.fullmatch(r"\$\{\{ inputs\.([\w-]+) \}\}", str(value))
            env[key] = inputs[expression.group(1)] if expression else str(value)
        for line in self.files["GITHUB_ENV"].read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
        added = self.files["GITHUB_PATH"].read_text().split()
        env["PATH"] = os.pathsep.join([*reversed(added), env["PATH"]])
        return subprocess.run(
            self.service.in_ns(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                                step["run"]]),
            env=env, cwd=self.service.tmp, capture_output=True, text=True, timeout=180)


def action_inputs(**given: str) -> dict:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    return {name: given.get(name, spec.get("default", "")) for name, spec in
            action["inputs"].items()}


def readme_final_step() -> dict:
    """The workflow in the README: its last step is the `sluice down` that always runs."""
    readme = (ROOT / "README.md").read_text()
    workflow = yaml.safe_load(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    [job] = workflow["jobs"].values()
    final = job["steps"][-1]
    assert final["if"] == "always()" and "sluice down" in final["run"]
    return final


def run_job(lab, tmp_path: Path, **inputs: str):
    service = Service(lab, tmp_path)
    actions = FakeActions(service, tmp_path)
    values = action_inputs(**inputs)
    for step in yaml.safe_load((ROOT / "action.yml").read_text())["runs"]["steps"]:
        result = actions.run(step, values)
        assert result.returncode == 0, f"{step['name']}: {result.stderr}"
    # The job's own work: one allowed connection, one that is not.
    assert lab.client_run("tcp", Lab.SERVER_V4, "80", "--name", "build")["ok"]
    lab.client_run("tcp", Lab.SERVER_V4, "443", "--timeout", "1", "--name", "build")
    wait_for(lambda: {r.get("dst_port") for r in service.jsonl()} >= {80, 443},
             "records", timeout=15)
    down = actions.run(readme_final_step(), values)
    return service, actions, down


def test_the_action_gate_fails_on_an_unexpected_block(lab, tmp_path):
    lab.start_server(80, 443)
    service, actions, down = run_job(lab, tmp_path, mode="enforce",
                                     **{"allowed-cidrs": f"{Lab.SERVER_V4}:80",
                                        "fail-on-block": "true"})
    assert down.returncode == 8, down.stderr
    [annotation] = down.stdout.splitlines()
    assert re.fullmatch(
        rf"::error title=sluice%3A unexpected block of {Lab.SERVER_V4}%3A443::"
        rf"{Lab.SERVER_V4}:443 \(TCP\) blocked \d+ time\(s\) by build, first at \S+ "
        r"\(not in the expected-blocks file\)", annotation), annotation
    summary = actions.files["GITHUB_STEP_SUMMARY"].read_text()
    assert summary.startswith("## sluice egress report: `svc-host`")
    assert f"| `{Lab.SERVER_V4}:443` | TCP | build | " in summary
    assert f'+SLUICE_ALLOWED_CIDRS={Lab.SERVER_V4}:80,{Lab.SERVER_V4}:443' in summary
    outputs = actions.files["GITHUB_OUTPUT"].read_text().splitlines()
    assert f"log={service.run_dir}/sluice.log" in outputs
    assert "blocked=1" in outputs and "unexpected=1" in outputs
    assert_nothing_left(service, set())


def test_the_action_gate_passes_when_the_block_is_expected(lab, tmp_path):
    lab.start_server(80, 443)
    (tmp_path / "expected-blocks.txt").write_text(f"# the job probes this on purpose\n"
                                                 f"{Lab.SERVER_V4}:443\n")
    service, actions, down = run_job(lab, tmp_path, mode="audit",
                                     **{"allowed-cidrs": f"{Lab.SERVER_V4}:80",
                                        "fail-on-block": "true",
                                        "expected-blocks": "expected-blocks.txt"})
    assert down.returncode == 0, down.stderr
    assert down.stdout == ""
    summary = actions.files["GITHUB_STEP_SUMMARY"].read_text()
    assert "audit mode" in summary and "would have been blocked" in summary
    assert f"| `{Lab.SERVER_V4}:443` | TCP | build | " in summary
    assert "unexpected=0" in actions.files["GITHUB_OUTPUT"].read_text().splitlines()
    assert_nothing_left(service, set())


def test_bad_gate_input_leaves_the_pipeline_running(lab, tmp_path):
    service = Service(lab, tmp_path, ALLOW_80)
    assert service.sluice("up").returncode == 0
    try:
        (tmp_path / "expected.txt").write_text("no-port-here\n")
        bad = service.sluice("down", "--fail-on-block",
                             "--expected", str(tmp_path / "expected.txt"))
        assert bad.returncode == 2
        assert bad.stderr == f"sluice: {tmp_path}/expected.txt:1: expected name:port or " \
                             "address:port (the port may be *), found 'no-port-here'\n"
        service.env["GITHUB_STEP_SUMMARY"] = "/proc/version"
        unwritable = service.sluice("down")
        assert unwritable.returncode == 2
        assert unwritable.stderr.startswith("sluice: GITHUB_STEP_SUMMARY /proc/version: cannot "
                                            "write")
        del service.env["GITHUB_STEP_SUMMARY"]
        assert json.loads(service.sluice("status", "--json").stdout)["ready"], \
            "the pipeline is untouched"
    finally:
        assert service.sluice("down").returncode == 0
    assert_nothing_left(service, set())


def test_down_after_the_pipeline_died_fails_loudly_and_still_cleans_up(lab, tmp_path):
    lab.start_server(443)
    service = Service(lab, tmp_path, ALLOW_80)
    assert service.sluice("up").returncode == 0
    hooks = hook_ids(service.run_dir)
    assert not lab.client_run("tcp", Lab.SERVER_V4, "443", "--timeout", "1")["ok"]
    wait_for(lambda: any(r.get("dst_port") == 443 for r in service.jsonl()),
             "the block", timeout=15)
    record = json.loads((service.run_dir / "sluice.json").read_text())
    os.kill(record["stages"]["dns"], 9)  # one stage dies: honcho takes the others down
    wait_for(lambda: processes_of(service.run_dir) == [], "the pipeline to go down", timeout=20)
    status = service.sluice("status")
    assert status.returncode == 1 and "classifier    stale" in status.stdout
    down = service.sluice("down")
    assert down.returncode == 3, down.stderr
    assert (f"sluice: the pipeline (pid {record['pid']}) had stopped before `sluice down`: "
            "protection ended early") in down.stderr
    assert "report: 1 destination(s) blocked" in down.stderr, "the run is still reported"
    assert_nothing_left(service, hooks)


def test_down_says_what_was_captured_but_not_stored_before_the_stop(lab, tmp_path):
    """persist stopped (SIGSTOP) while a block is captured: the record waits in capture's
    journal, and `sluice down` says the report does not show it, with where it waits."""
    service = Service(lab, tmp_path, ALLOW_80)
    assert service.sluice("up").returncode == 0
    hooks = hook_ids(service.run_dir)
    record = json.loads((service.run_dir / "sluice.json").read_text())
    os.kill(record["stages"]["persist"], signal.SIGSTOP)  # the stop kills it as it is
    assert not lab.client_run("tcp", Lab.SERVER_V4, "443", "--timeout", "1")["ok"]
    counters = service.run_dir / "capture.counters.json"
    wait_for(lambda: json.loads(counters.read_text())["counters"].get(
        "records_journaled", 0) > 0, "the block journaled", timeout=15)
    down = service.sluice("down")
    assert re.search(r"sluice: \d+ record\(s\) captured before the stop are not stored yet, "
                     r"so this report does not show them: they wait in \S+ for the next "
                     r"start", down.stderr), down.stderr
    assert_nothing_left(service, hooks)
