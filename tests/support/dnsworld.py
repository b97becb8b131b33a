"""The DNS redirect tests' world: the server namespace's upstream and two bystander resolvers
(BYSTANDER:53 and [SERVER_V6]:53) serving one zone and logging what they are asked, a web
server, the routes to them, the policy those tests run, and the redirect-aware DNS client
(tests/support/tools/dnsclient.py) run in a namespace. A query the redirect missed is answered
by a bystander and shows in its log.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.support.netns import PYTHON, ROOT, Lab, sh
from tests.support.pipeline import Pipeline

BYSTANDER = "10.202.0.5"
ZONE = {
    **{f"n{i}.allowed.test": {"A": [f"10.203.0.{i + 1}"], "ttl": 30} for i in range(100)},
    **{f"v{i}.allowed.test": {"AAAA": [f"fd51:0:0:1::{i + 1}"], "ttl": 30} for i in range(4)},
    "www.denied.test": {"A": ["10.203.2.2"], "ttl": 60},
    "blocked-by-port.test": {"A": ["10.203.2.3"], "ttl": 60},
}
POLICY = {"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": "allowed.test", "action": "allow",
     "ports": [{"port": 80, "protocol": "tcp"}]},
    {"type": "hostname", "value": "denied.test", "action": "deny"},
    {"type": "cidr", "value": f"{Lab.SERVER_V4}/32", "action": "allow",
     "ports": [{"port": 53, "protocol": "udp"}, {"port": 53, "protocol": "tcp"}]},
]}


def bulk_address(i: int) -> str:
    return f"10.210.{i // 250}.{i % 250 + 1}"


def bulk_zone(count: int) -> dict:
    return {f"b{i}.bulk.test": {"A": [bulk_address(i)], "ttl": 30} for i in range(count)}


class DnsWorld:
    """The server namespace's resolvers and web server, and routes to them."""

    def __init__(self, lab: Lab, tmp: Path, zone: dict, bulk: int = 0) -> None:
        self.lab, self.tmp = lab, tmp
        batch = [f"address add 10.203.{third}.{host}/32 dev lo"
                 for third, hosts in ((0, 100), (2, 4)) for host in range(1, hosts + 1)]
        batch += [f"address add fd51:0:0:1::{host}/128 dev lo" for host in range(1, 5)]
        batch += [f"address add {bulk_address(i)}/32 dev lo" for i in range(bulk)]
        self.ip_batch(lab.server, batch)
        for subnet in ("10.203.0.0/16", "10.210.0.0/16"):
            sh("ip", "-n", lab.client, "route", "add", subnet, "via", Lab.SERVER_V4)
        sh("ip", "-n", lab.client, "-6", "route", "add", "fd51:0:0:1::/64", "via", Lab.SERVER_V6)
        (tmp / "zone.json").write_text(json.dumps(zone))
        for name, address in (("upstream", f"{Lab.SERVER_V4}:53"),
                              ("bystander", f"{BYSTANDER}:53"),
                              ("bystander6", f"[{Lab.SERVER_V6}]:53")):
            self.resolver(name, address)
        lab.start_server(80)
        self.etc = []

    def ip_batch(self, ns: str, commands: list[str]) -> None:
        script = self.tmp / f"batch-{ns}"
        script.write_text("\n".join(commands) + "\n")
        sh("ip", "-n", ns, "-batch", str(script))

    def resolver(self, name: str, address: str) -> None:
        log = self.tmp / f"{name}.log"
        log.touch()
        proc = subprocess.Popen(
            self.lab.exec_args(self.lab.server)
            + [PYTHON, "-m", "tests.support.tools.dnsserver", address,
               str(self.tmp / "zone.json"), str(log)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.lab.processes.append(proc)
        assert proc.stdout.readline().strip() == "ready"

    def asked(self, name: str) -> list[str]:
        return (self.tmp / f"{name}.log").read_text().split()[::2]

    def resolv_conf(self, ns: str, text: str) -> None:
        """What `ip netns exec ns` shows as /etc/resolv.conf."""
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(text)
        self.etc.append(etc)

    def close(self) -> None:
        for etc in self.etc:
            shutil.rmtree(etc, ignore_errors=True)


def client(lab: Lab, *args: str, ns: str | None = None, prefix: list[str] = (),
           timeout: float = 180) -> dict:
    command = (prefix or lab.exec_args(ns or lab.client)) + [
        PYTHON, "-m", "tests.support.tools.dnsclient", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def first_syn_for_all(outcome: dict) -> None:
    failed = [r for r in outcome["results"] if not r["ok"]]
    assert not failed, failed[:3]
    slowest = max(r["connect_s"] for r in outcome["results"])
    assert slowest < 1.0, f"a first SYN was retransmitted (slowest connect {slowest:.3f} s)"
    assert outcome["retransmitted"] == 0


def stop_and_detach(pipeline: Pipeline) -> None:
    assert pipeline.stop()["dns"] == "rc=0"
    assert pipeline.sluice("detach", netns=True).returncode == 0
