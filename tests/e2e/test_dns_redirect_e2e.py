"""End to end, enforce mode: every DNS path goes through the proxy.

The whole Procfile runs in the lab's client namespace ("the host"), its hooks on the lab's
test cgroup, where the pipeline itself and every client the test starts live. The server
namespace holds the upstream (SERVER_V4:53) and two bystander resolvers (BYSTANDER:53 and
[SERVER_V6]:53) that serve the same zone and log what they are asked: a query the redirect
missed would be answered there, and show in their logs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.dns.endpoints import REDIRECT_V4, REDIRECT_V6
from tests.support.dnsworld import (BYSTANDER, POLICY, ZONE, DnsWorld, bulk_address, bulk_zone,
                                    client, first_syn_for_all, stop_and_detach)
from tests.support.netns import ROOT, Lab, sh
from tests.support.pipeline import Pipeline, attached_cgroup_prog_ids, find
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
PYTHON = sys.executable
NAMES = 50


@pytest.fixture
def world(lab, tmp_path):
    world = DnsWorld(lab, tmp_path, ZONE)
    try:
        yield world
    finally:
        world.close()


def start(lab: Lab, tmp_path: Path, upstream: str = f"{Lab.SERVER_V4}:53", **env) -> Pipeline:
    pipeline = Pipeline(lab, tmp_path, POLICY)
    pipeline.env.update(SLUICE_DNS_UPSTREAM=upstream, **env)
    return pipeline.start()


# ------------------------------------------------------------------ the tests


def test_a_client_asking_any_resolver_gets_the_proxys_answer_from_the_address_it_asked(
        lab, world, tmp_path):
    world.resolv_conf(lab.client, "nameserver 127.0.0.1\n")
    pipeline = start(lab, tmp_path)
    for via in ("udp", "connected", "tcp"):
        answer = client(lab, "ask", BYSTANDER, "n1.allowed.test", "--via", via)
        assert (answer["rcode"], answer["source"], answer["port"], answer["id_matches"]) == (
            "NOERROR", BYSTANDER, 53, True), via
        assert answer["records"] == ["n1.allowed.test. 30 IN A 10.203.0.2"]
    six = client(lab, "ask", Lab.SERVER_V6, "v1.allowed.test", "--type", "AAAA")
    assert (six["rcode"], six["source"]) == ("NOERROR", Lab.SERVER_V6)
    # The upstream's own address is no way around the query filter either.
    refused = client(lab, "ask", Lab.SERVER_V4, "www.denied.test")
    assert (refused["rcode"], refused["source"]) == ("REFUSED", Lab.SERVER_V4)
    assert client(lab, "ask", BYSTANDER, "www.denied.test", "--via", "tcp")["rcode"] == "REFUSED"
    # Answered by the proxy, so opened just in time: the first SYN passes.
    assert lab.client_run("tcp", "10.203.0.2", "80", "--timeout", "1")["ok"]
    assert lab.client_run("tcp", "fd51:0:0:1::2", "80", "--timeout", "1")["ok"]

    assert world.asked("bystander") == [] and world.asked("bystander6") == []
    assert "www.denied.test" not in world.asked("upstream")
    assert "n1.allowed.test" in world.asked("upstream")   # the proxy's own query, let through
    wait_for(lambda: [r for r in pipeline.rows() if r["event_type"] == "dns_blocked"],
             "the dns_blocked rows", timeout=15)
    assert {r["dst_hostname"] for r in pipeline.rows() if r["event_type"] == "dns_blocked"} == {
        "www.denied.test"}
    wait_for(lambda: pipeline.counters("capture").get("kernel_dns_redirected", 0) >= 6,
             "the kernel's count of redirected queries", timeout=10)
    assert pipeline.counters("capture")["dns_redirect"] == 1
    stop_and_detach(pipeline)


def test_a_stub_resolvers_own_queries_go_through_the_proxy_and_fresh_names_pass_at_once(
        lab, world, tmp_path):
    # dnsmasq on 127.0.0.53, forwarding to the upstream, as systemd-resolved's stub does;
    # the proxy finds that upstream where systemd-resolved keeps it, not in resolv.conf.
    world.resolv_conf(lab.client, "nameserver 127.0.0.53\noptions attempts:1\n")
    stub = subprocess.Popen(lab.exec_args(lab.client) + [
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
        "--listen-address=127.0.0.53", f"--server={Lab.SERVER_V4}", "--cache-size=1000",
        "--user=root", "--pid-file=", "--log-facility=-"], cwd=ROOT, stderr=subprocess.PIPE,
        text=True)
    lab.processes.append(stub)
    resolved = tmp_path / "resolved-resolv.conf"
    resolved.write_text(f"# systemd-resolved's upstreams\nnameserver {Lab.SERVER_V4}\n")
    pipeline = Pipeline(lab, tmp_path, POLICY).start(resolved_upstreams=resolved)
    assert f"forwarding to {Lab.SERVER_V4}:53" in pipeline.output()

    names = [f"n{i}.allowed.test" for i in range(NAMES)]
    first_syn_for_all(client(lab, "resolve-connect", "80", *names))
    assert world.asked("bystander") == []
    wait_for(lambda: len({r["dst_hostname"] for r in find(pipeline.jsonl(),
                                                          event_type="connection_allowed")
                          if r.get("dst_hostname")}) >= NAMES, "a named row per name", timeout=20)
    denied = client(lab, "ask", "127.0.0.53", "www.denied.test")
    assert denied["rcode"] in ("REFUSED", "SERVFAIL")   # dnsmasq passes a refusal on as either
    assert "www.denied.test" not in world.asked("upstream")
    wait_for(lambda: find(pipeline.jsonl(), event_type="dns_blocked",
                          dst_hostname="www.denied.test"), "the dns_blocked record", timeout=15)
    assert "systemd-resolved is not running: no resolver cache to flush" in pipeline.output()
    assert "conntrack entr" in pipeline.output()
    stop_and_detach(pipeline)


def test_after_detach_no_redirect_hook_or_address_is_left_and_dns_works_as_before(
        lab, world, tmp_path):
    world.resolv_conf(lab.client, "nameserver 127.0.0.1\n")
    pipeline = start(lab, tmp_path)
    hooks = pipeline.hook_ids()
    assert len(hooks) == 9 and hooks <= attached_cgroup_prog_ids()
    assert client(lab, "ask", BYSTANDER, "n2.allowed.test")["source"] == BYSTANDER
    assert world.asked("bystander") == []

    # A crashed pipeline in enforce mode fails closed: queries fail, none goes around.
    for stage in ("dns", "capture"):
        pid = int((tmp_path / "run" / f"{stage}.ready").read_text().split("=")[1])
        pipeline_kill(pid)
    failed = client(lab, "ask", BYSTANDER, "n3.allowed.test", "--timeout", "1")
    assert not failed["ok"]
    assert client(lab, "ask", Lab.SERVER_V4, "n3.allowed.test", "--timeout", "1")["ok"] is False
    assert world.asked("bystander") == [] and "n3.allowed.test" not in world.asked("upstream")

    pipeline.stop()
    detached = pipeline.sluice("detach", netns=True)
    assert detached.returncode == 0, detached.stderr
    assert "DNS redirect address" in detached.stdout
    assert not hooks & attached_cgroup_prog_ids()
    addresses = sh(*lab.exec_args(lab.client), "ip", "address", "show", "dev", "lo").stdout
    assert REDIRECT_V4 not in addresses and REDIRECT_V6 not in addresses
    answer = client(lab, "ask", BYSTANDER, "n3.allowed.test")
    assert (answer["rcode"], answer["source"]) == ("NOERROR", BYSTANDER)
    assert world.asked("bystander") == ["n3.allowed.test"]


def test_a_program_already_on_port_53_at_the_redirect_address_stops_the_start_in_one_line(
        lab, world, tmp_path):
    holder = subprocess.Popen(lab.exec_args(lab.client) + [PYTHON, "-c", HOLD_PORT_53],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.processes.append(holder)
    assert holder.stdout.readline().strip() == "holding"
    pipeline = Pipeline(lab, tmp_path, POLICY)
    pipeline.env["SLUICE_DNS_UPSTREAM"] = f"{Lab.SERVER_V4}:53"
    with pytest.raises(AssertionError) as failed:
        pipeline.start()
    assert (f"stage dns failed: cannot listen on {REDIRECT_V4}:53/udp: Address already in use "
            f"(held by sl-hold pid {holder.pid})") in str(failed.value)
    stop_failed_start(lab, pipeline)


HOLD_PORT_53 = f"""
import ctypes, socket, sys
ctypes.CDLL(None).prctl(15, b"sl-hold", 0, 0, 0)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the address is not on lo yet
sock.bind(("{REDIRECT_V4}", 53))
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_without_its_hooks_the_redirect_is_reported_failed_and_the_pipeline_is_not_ready(
        lab, world, tmp_path, mode):
    not_a_cgroup = tmp_path / "not-a-cgroup"
    not_a_cgroup.mkdir()
    pipeline = Pipeline(lab, tmp_path, POLICY, mode=mode)
    pipeline.env.update(SLUICE_DNS_UPSTREAM=f"{Lab.SERVER_V4}:53",
                        SLUICE_CGROUP=str(not_a_cgroup))
    with pytest.raises(AssertionError) as failed:
        pipeline.start()
    if mode == "enforce":
        assert ("stage capture failed: DNS redirect: hook(s) sluice_connect4, sluice_connect6, "
                "sluice_sendmsg4, sluice_sendmsg6, sluice_recvmsg4, sluice_recvmsg6, "
                "sluice_getpeername4, sluice_getpeername6 not attached, so queries would skip "
                "the proxy; enforce mode does not run without it") in str(failed.value)
    else:
        # Both hook layers fail here, and the wait for readiness may end on cgroup_hooks'
        # failure before capture has reported the redirect's: the status shows it then.
        wait_for(lambda: any(
            line.startswith("layer dns_redirect is failed: DNS redirect: hook(s)")
            for line in json.loads(pipeline.sluice("status", "--json").stdout)["problems"]),
            "the redirect reported failed", timeout=15)
    assert "cgroup hook sluice_connect4 not attached on" in pipeline.output()
    stop_failed_start(lab, pipeline)


def stop_failed_start(lab: Lab, pipeline: Pipeline) -> None:
    """honcho of a start that never got ready: stopped (if a failed stage has not already
    taken it down), then nothing of it left."""
    honcho = lab.processes[-1]
    honcho.send_signal(signal.SIGINT)
    honcho.wait(15)
    pipeline.log.close()
    assert pipeline.sluice("detach", netns=True).returncode == 0
    assert REDIRECT_V4 not in sh("ip", "-n", lab.client, "address", "show", "dev", "lo").stdout


BULK = 1000


def test_a_thousand_fresh_names_8_at_a_time_all_pass_at_the_first_syn_and_all_rows_are_named(
        lab, tmp_path):
    """Each name on its own address, asked of an arbitrary resolver (redirected): every
    connection at its first SYN, and every connection_allowed row carries its name,
    whichever reached enrich first, the answer's mapping or the connection's event."""
    world = DnsWorld(lab, tmp_path, {**ZONE, **bulk_zone(BULK)}, bulk=BULK)
    try:
        world.resolv_conf(lab.client, f"nameserver {BYSTANDER}\noptions attempts:1\n")
        policy = {**POLICY, "rules": POLICY["rules"] + [
            {"type": "hostname", "value": "bulk.test", "action": "allow",
             "ports": [{"port": 80, "protocol": "tcp"}]}]}
        pipeline = Pipeline(lab, tmp_path, policy)
        pipeline.env.update(SLUICE_DNS_UPSTREAM=f"{Lab.SERVER_V4}:53")
        pipeline.start()
        names = {f"b{i}.bulk.test": bulk_address(i) for i in range(BULK)}
        outcome = client(lab, "resolve-connect", "80", *names, "--parallel", "8", timeout=600)
        first_syn_for_all(outcome)
        assert {r["name"]: r["ip"] for r in outcome["results"]} == names
        assert world.asked("bystander") == []

        def rows():
            return [r for r in pipeline.rows() if r["event_type"] == "connection_allowed"
                    and r["dst_ip"].startswith("10.210.")]

        wait_for(lambda: len(rows()) >= BULK, f"{BULK} connection_allowed rows", timeout=120)
        by_ip = {ip: name for name, ip in names.items()}
        unnamed = [r["dst_ip"] for r in rows() if r["dst_hostname"] != by_ip[r["dst_ip"]]]
        assert not unnamed, f"{len(unnamed)} row(s) without their name: {unnamed[:5]}"
        assert len(rows()) == BULK
        lines = [r for r in find(pipeline.jsonl(), event_type="connection_allowed")
                 if r["dst_ip"].startswith("10.210.")]
        assert {(r["dst_ip"], r["dst_hostname"]) for r in lines} == set(by_ip.items())
        stop_and_detach(pipeline)
    finally:
        world.close()


def pipeline_kill(pid: int) -> None:
    import os

    os.kill(pid, signal.SIGKILL)
