"""End to end: a destination named only by its PTR record is late-allowed, through honcho."""

import subprocess
from pathlib import Path

import pytest

from pipeline.topology import STAGES
from tests.support.netns import PYTHON, ROOT, Lab
from tests.support.pipeline import Pipeline, find
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
TARGET = "10.202.0.3"
SPOOFED = "10.202.0.4"  # its PTR claims an allowed name; the name does not resolve back


@pytest.fixture
def resolver_in_server(lab):
    """A PTR-answering DNS server in the server namespace, and the client namespace's
    resolv.conf pointing at it (`ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf)."""
    server = subprocess.Popen(
        lab.exec_args(lab.server) + [PYTHON, "-m", "tests.support.tools.ptrserver", Lab.SERVER_V4,
                                     "53", "--ptr", f"{TARGET}=Web-3.Allowed.Example.",
                                     "--spoof", f"{SPOOFED}=exfil.allowed.example."],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lab.processes.append(server)
    assert server.stdout.readline().strip() == "ready"
    netns_etc = Path("/etc/netns") / lab.client
    netns_etc.mkdir(parents=True)
    try:
        (netns_etc / "resolv.conf").write_text(f"nameserver {Lab.SERVER_V4}\n")
        yield
    finally:
        (netns_etc / "resolv.conf").unlink(missing_ok=True)
        netns_etc.rmdir()


POLICY = {"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": "allowed.example", "action": "allow",
     "ports": [{"port": 80, "protocol": "tcp"}]},
    {"type": "cidr", "value": f"{Lab.SERVER_V4}/32", "action": "allow",
     "ports": [{"port": 53, "protocol": "udp"}]}]}


def test_a_connection_by_address_is_late_allowed_by_its_ptr_name(lab, tmp_path,
                                                                  resolver_in_server):
    lab.start_server(80, 443)
    pipeline = Pipeline(lab, tmp_path, POLICY).start()

    # No DNS through the proxy: the process connects to the address itself. Its first SYN
    # is dropped; by the kernel's retry the name is known and the address allowed.
    allowed = lab.client_run("tcp", TARGET, "80", "--timeout", "5", "--name", "sl-ptr")
    assert allowed["ok"], allowed
    blocked = lab.client_run("tcp", TARGET, "443", "--timeout", "2", "--name", "sl-ptr")
    assert not blocked["ok"]
    wait_for(lambda: find(pipeline.jsonl(), event_type="connection_blocked", dst_port=443),
             "the blocked record", timeout=15)
    assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}

    lines = pipeline.jsonl()
    [late] = find(lines, event_type="connection_late_allowed")
    assert (late["dst_ip"], late["dst_port"], late["dst_hostname"], late["matched_rule"],
            late["process"], late["pid"]) == (TARGET, 80, "allowed.example", "allowed.example",
                                              "sl-ptr", allowed["pid"])
    assert find(lines, event_type="connection_allowed", dst_ip=TARGET, dst_port=80,
                dst_hostname="allowed.example"), "the retried SYN passed, named"
    assert {r["dst_hostname"] for r in find(lines, dst_ip=TARGET, dst_port=443)} == {
        "allowed.example"}
    assert {r["event_type"] for r in find(lines, dst_ip=TARGET, dst_port=443)} == {
        "connection_blocked"}, "the rule allows port 80 only"
    [row] = [r for r in pipeline.rows() if r["event_type"] == "connection_late_allowed"]
    assert (row["matched_rule"], row["dst_hostname"]) == ("allowed.example", "allowed.example")
    assert pipeline.sluice("detach", netns=True).returncode == 0


def test_a_ptr_name_that_does_not_resolve_back_opens_nothing(lab, tmp_path, resolver_in_server):
    # Whoever controls an address's reverse zone picks its PTR name; only a name whose own
    # records include the address may late-allow it.
    lab.start_server(80)
    pipeline = Pipeline(lab, tmp_path, POLICY).start()
    attempt = lab.client_run("tcp", SPOOFED, "80", "--timeout", "4", "--name", "sl-spoof")
    assert not attempt["ok"], "a spoofed PTR name must not open the firewall"
    wait_for(lambda: find(pipeline.jsonl(), dst_ip=SPOOFED), "the blocked record", timeout=15)
    assert pipeline.stop() == {stage: "rc=0" for stage in STAGES}
    records = find(pipeline.jsonl(), dst_ip=SPOOFED)
    assert {r["event_type"] for r in records} == {"connection_blocked"}
    assert {r.get("dst_hostname", "") for r in records} == {""}
    assert pipeline.sluice("detach", netns=True).returncode == 0
