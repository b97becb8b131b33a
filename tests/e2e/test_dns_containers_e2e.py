"""End to end, enforce mode: a "container" behind a bridge with NAT, as Docker, Podman and kind
make them, and its processes in a cgroup named like Docker's.

Inside the lab's client namespace ("the host", where the Procfile runs) a bridge joins a
container namespace; the host forwards and masquerades its traffic out of the veth the
classifier is on. Container processes run in `<lab cgroup>/system.slice/docker-<id>.scope`.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.support.dnsworld import (BYSTANDER, POLICY, ZONE, DnsWorld, client, first_syn_for_all,
                                    stop_and_detach)
from tests.support.netns import PYTHON, ROOT, Lab, LabCgroup, sh
from tests.support.pipeline import Pipeline, find
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
BRIDGE_V4, CONTAINER_V4 = "172.30.0.1", "172.30.0.2"
BRIDGE_V6, CONTAINER_V6 = "fd5c::1", "fd5c::2"
NAT = """table inet sluice_test_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{out}" ip saddr 172.30.0.0/24 masquerade
    oifname "{out}" ip6 saddr fd5c::/64 masquerade
  }}
}}
"""


class Container:
    """A network namespace behind a bridge in the lab's client namespace, with NAT, and a
    cgroup named like a Docker container's."""

    def __init__(self, lab: Lab, world: DnsWorld, tmp: Path) -> None:
        self.lab = lab
        self.ns = f"slk{lab.tag}"
        self.id = secrets.token_hex(32)
        self.cgroup = lab.cgroup.child(f"system.slice/docker-{self.id}.scope")
        host, bridge, veth = lab.client, f"br{lab.tag}", f"h{lab.tag}"
        sh("ip", "netns", "add", self.ns)
        world.ip_batch(host, [
            f"link add {bridge} type bridge", f"address add {BRIDGE_V4}/24 dev {bridge}",
            f"address add {BRIDGE_V6}/64 dev {bridge} nodad", f"link set {bridge} up",
            f"link add {veth} type veth peer name eth0 netns {self.ns}",
            f"link set {veth} master {bridge}", f"link set {veth} up"])
        world.ip_batch(self.ns, [
            "link set lo up", f"address add {CONTAINER_V4}/24 dev eth0",
            f"address add {CONTAINER_V6}/64 dev eth0 nodad", "link set eth0 up",
            f"route add default via {BRIDGE_V4}", f"route add default via {BRIDGE_V6}"])
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            sh(*lab.exec_args(host), "sysctl", "-q", "-w", key)
        nat = tmp / "nat.nft"
        nat.write_text(NAT.format(out=lab.client_if))
        sh(*lab.exec_args(host), "nft", "-f", str(nat))

    def args(self, cgroup: Path | None = None) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *LabCgroup.run_in(cgroup or self.cgroup)]

    def cgroup_text(self) -> str:
        """The cgroup a process in the container has, as /proc/<pid>/cgroup shows it."""
        out = subprocess.run(self.args() + ["cat", "/proc/self/cgroup"], capture_output=True,
                             text=True, check=True).stdout
        return next(line for line in out.splitlines() if line.startswith("0::"))[3:]

    def close(self) -> None:
        sh("ip", "netns", "del", self.ns, check=False)


@pytest.fixture
def container(lab, tmp_path):
    world = DnsWorld(lab, tmp_path, ZONE)
    box = None
    try:
        box = Container(lab, world, tmp_path)
        yield world, box
    finally:
        if box is not None:
            box.close()
        else:  # half made: its namespace may exist
            sh("ip", "netns", "del", f"slk{lab.tag}", check=False)
        world.close()


def test_a_containers_dns_is_answered_by_the_proxy_and_its_connections_carry_the_container(
        lab, container, tmp_path):
    world, box = container
    world.resolv_conf(lab.client, "nameserver 127.0.0.1\n")
    world.resolv_conf(box.ns, f"nameserver {BRIDGE_V4}\noptions attempts:1\n")  # the gateway
    # A DNS flow through the NAT from before sluice starts: conntrack has it, start clears it.
    early = client(lab, "ask", Lab.SERVER_V4, "n99.allowed.test", prefix=box.args())
    assert (early["rcode"], world.asked("upstream")) == ("NOERROR", ["n99.allowed.test"])
    pipeline = Pipeline(lab, tmp_path, POLICY)
    pipeline.env["SLUICE_DNS_UPSTREAM"] = f"{Lab.SERVER_V4}:53"
    pipeline.start()
    cleared = re.search(r"cleared (\d+) conntrack entr(y|ies) for port 53", pipeline.output())
    assert cleared and int(cleared.group(1)) >= 1, pipeline.output()
    cgroup = box.cgroup_text()
    assert cgroup.endswith(f"/system.slice/docker-{box.id}.scope")

    names = [f"n{i}.allowed.test" for i in range(60, 80)]
    outcome = client(lab, "resolve-connect", "80", *names, "--parallel", "4", "--name", "sl-ctr",
                     prefix=box.args())
    first_syn_for_all(outcome)
    answer = client(lab, "ask", BYSTANDER, "n80.allowed.test", prefix=box.args())
    assert (answer["rcode"], answer["source"]) == ("NOERROR", BYSTANDER)
    six = client(lab, "ask", Lab.SERVER_V6, "v2.allowed.test", "--type", "AAAA", "--via", "tcp",
                 prefix=box.args())
    assert (six["rcode"], six["source"]) == ("NOERROR", Lab.SERVER_V6)
    assert world.asked("bystander") == [] and world.asked("bystander6") == []
    blocked = subprocess.run(box.args() + [PYTHON, "-m", "tests.support.tools.netclient", "tcp",
                                           "10.203.2.3", "80", "--timeout", "1", "--name",
                                           "sl-ctr-block"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
    v6 = subprocess.run(box.args() + [PYTHON, "-m", "tests.support.tools.netclient", "tcp",
                                      "fd51:0:0:1::3", "80", "--timeout", "1", "--name", "sl-ctr6"],
                        cwd=ROOT, capture_output=True, text=True, check=True)
    assert '"ok": true' in v6.stdout and '"ok": false' in blocked.stdout
    blocked_pid = int(blocked.stdout.split('"pid": ')[1].split(",")[0])

    def records():
        return [r for r in pipeline.jsonl() if r.get("container") == box.id]

    wait_for(lambda: len(find(records(), event_type="connection_allowed")) >= len(names) + 1
             and find(records(), event_type="connection_blocked"),
             "the container's records", timeout=20)
    allowed = find(records(), event_type="connection_allowed", process="sl-ctr")
    assert {r["dst_hostname"] for r in allowed} == set(names)
    assert {(r["cgroup"], r["pid"]) for r in allowed} == {(cgroup, outcome["pid"])}
    [six_row] = find(records(), event_type="connection_allowed", dst_ip="fd51:0:0:1::3")
    assert (six_row["process"], six_row["dst_hostname"]) == ("sl-ctr6", "v2.allowed.test")
    [block] = find(records(), event_type="connection_blocked", dst_port=80)[:1]
    assert (block["process"], block["pid"], block["cgroup"], block["dst_ip"]) == (
        "sl-ctr-block", blocked_pid, cgroup, "10.203.2.3")
    rows = [r for r in pipeline.rows() if r["container"] == box.id]
    assert len(rows) == len(records()) and {r["cgroup"] for r in rows} == {cgroup}
    stop_and_detach(pipeline)


def test_a_containers_embedded_resolver_forwards_through_the_proxy(lab, container, tmp_path):
    # Docker's embedded resolver: 127.0.0.11 inside the container, served by a process of
    # the host (dockerd, in its own cgroup) that forwards to the host's resolvers.
    world, box = container
    world.resolv_conf(lab.client, "nameserver 127.0.0.1\n")
    world.resolv_conf(box.ns, "nameserver 127.0.0.11\noptions attempts:1\n")
    daemon_cgroup = lab.cgroup.child("system.slice/docker.service")
    embedded = subprocess.Popen(box.args(daemon_cgroup) + [
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
        "--listen-address=127.0.0.11", f"--server={BYSTANDER}", "--user=root", "--pid-file=",
        "--log-facility=-"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lab.processes.append(embedded)
    pipeline = Pipeline(lab, tmp_path, POLICY)
    pipeline.env["SLUICE_DNS_UPSTREAM"] = f"{Lab.SERVER_V4}:53"
    pipeline.start()
    names = [f"n{i}.allowed.test" for i in range(81, 91)]
    first_syn_for_all(client(lab, "resolve-connect", "80", *names, "--name", "sl-embed",
                             prefix=box.args()))
    assert world.asked("bystander") == []
    wait_for(lambda: len(find(pipeline.jsonl(), event_type="connection_allowed",
                              container=box.id, process="sl-embed")) >= len(names),
             "the records", timeout=20)
    stop_and_detach(pipeline)
