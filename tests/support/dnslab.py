"""The DNS end-to-end tests' lab: addresses in 10.203/16 in the server namespace (routed to
from the client namespace), a web server and an authoritative upstream there serving a zone,
the client namespace's resolv.conf naming the proxy, and the resolving client
(tests/support/tools/resolvclient.py) run in that namespace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.support.netns import PYTHON, ROOT, Lab, sh

NAMES = 100
ZONE = {
    **{f"n{i}.allowed.test": {"A": [f"10.203.0.{i + 1}"], "ttl": 30} for i in range(NAMES)},
    "www.chain.test": {"CNAME": "hop.middle.test", "ttl": 300},
    "hop.middle.test": {"CNAME": "edge.cdn.test", "ttl": 60},
    "edge.cdn.test": {"A": ["10.203.1.1"], "ttl": 60},
    "cut.chain.test": {"CNAME": "far.cdn.test", "stop": True, "ttl": 60},
    "far.cdn.test": {"A": ["10.203.1.2"], "ttl": 60},
    "late.allowed.test": {"A": ["10.203.2.1"], "ttl": 60},
    "www.denied.test": {"A": ["10.203.2.2"], "ttl": 60},
}


class DnsLab:
    """The lab plus what DNS needs: routes to 10.203/16 served by the server namespace, the
    upstream there, and the client namespace's resolv.conf naming the proxy."""

    def __init__(self, lab, tmp_path: Path, zone: dict = ZONE) -> None:
        self.lab = lab
        for third in range(3):
            for host in range(1, NAMES + 1 if third == 0 else 3):
                sh("ip", "-n", lab.server, "addr", "add", f"10.203.{third}.{host}/32", "dev", "lo")
        sh("ip", "-n", lab.client, "route", "add", "10.203.0.0/16", "via", Lab.SERVER_V4)
        zone_file = tmp_path / "zone.json"
        zone_file.write_text(json.dumps(zone))
        upstream = subprocess.Popen(
            lab.exec_args(lab.server) + [PYTHON, "-m", "tests.support.tools.dnsserver",
                                         f"{Lab.SERVER_V4}:53", str(zone_file)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        lab.processes.append(upstream)
        assert upstream.stdout.readline().strip() == "ready"
        lab.start_server(80)
        self.netns_etc = Path("/etc/netns") / lab.client
        self.netns_etc.mkdir(parents=True, exist_ok=True)
        (self.netns_etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1\n")

    def client(self, *args: str) -> dict:
        result = subprocess.run(
            self.lab.exec_args(self.lab.client)
            + [PYTHON, "-m", "tests.support.tools.resolvclient", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def close(self) -> None:
        shutil.rmtree(self.netns_etc, ignore_errors=True)
