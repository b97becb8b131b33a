"""Network namespaces for kernel and end-to-end tests: a client and a server joined by a veth.

The classifier only ever runs on the client's veth, inside a namespace the test created;
never on this machine's own interfaces. The cgroup hooks (socket owners, the DNS redirect)
only ever go on a cgroup the test created, and only processes the test starts live in it.
Everything is removed on close.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


# A fresh /run in which /run/systemd/resolve/resolv.conf is $1 (and /etc/resolv.conf still
# reads the same, should it point into /run); then the command.
WITH_RESOLVED_UPSTREAMS = r"""
conf="$(cat /etc/resolv.conf)"; target="$(readlink -f /etc/resolv.conf)"
mount -t tmpfs sluice-test-run /run && mkdir -p /run/systemd/resolve || exit 1
cp "$1" /run/systemd/resolve/resolv.conf || exit 1
case "$target" in /run/*) mkdir -p "$(dirname "$target")"; printf '%s\n' "$conf" > "$target";; esac
shift; exec "$@"
"""


class LabCgroup:
    """A cgroup v2 directory of the test's own, on a cgroup2 mount under /tmp: visible in every
    mount namespace the test starts (`ip netns exec` hides /sys/fs/cgroup), and the only place
    the tests attach cgroup hooks, so no real host process is ever redirected."""

    def __init__(self, tag: str) -> None:
        self.mount = Path(tempfile.mkdtemp(prefix=f"sluice-cg{tag}-"))
        sh("mount", "-t", "cgroup2", "none", str(self.mount))
        self.path = self.mount / f"sluice-test-{tag}"
        self.path.mkdir()
        # The test's own processes live in a leaf: a cgroup with processes of its own cannot
        # hand controllers to children (cgroup v2), which a container runtime's may need.
        self.leaf = self.child("lab")

    def child(self, relative: str) -> Path:
        path = self.path / relative
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def run_in(cgroup: Path) -> list[str]:
        """A command prefix that moves the command into cgroup before it starts."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup)]

    def close(self) -> None:
        kill = self.path / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")  # whatever a test left running in its cgroups
        for directory in sorted((d for d in self.path.rglob("*") if d.is_dir()),
                                key=lambda d: len(d.parts), reverse=True) + [self.path]:
            wait_for(lambda d=directory: _rmdir(d), f"{directory} empty", timeout=5)
        sh("umount", str(self.mount), check=False)
        self.mount.rmdir()


def _rmdir(directory: Path) -> bool:
    try:
        directory.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


class Lab:
    """client ns --(veth c<tag> / s<tag>)-- server ns, IPv4 and IPv6."""

    CLIENT_V4, SERVER_V4 = "10.201.0.1", "10.201.0.2"
    SUBNET = "10.202.0.0/24"          # extra server addresses, routed via the server
    CLIENT_V6, SERVER_V6 = "fd51::1", "fd51::2"

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.tag = tag
        self.client, self.server = f"slc{tag}", f"sls{tag}"
        self.client_if, self.server_if = f"c{tag}", f"s{tag}"
        self.processes: list[subprocess.Popen] = []
        self.cgroup: LabCgroup | None = None

    def create(self) -> Lab:
        self.cgroup = LabCgroup(self.tag)
        c, s = self.client, self.server
        sh("ip", "netns", "add", c)
        sh("ip", "netns", "add", s)
        sh("ip", "-n", c, "link", "add", self.client_if, "type", "veth", "peer", "name",
           self.server_if, "netns", s)
        for ns, dev, v4, v6 in ((c, self.client_if, self.CLIENT_V4, self.CLIENT_V6),
                                (s, self.server_if, self.SERVER_V4, self.SERVER_V6)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for host in range(1, 6):
            sh("ip", "-n", s, "addr", "add", f"10.202.0.{host}/32", "dev", "lo")
        sh("ip", "-n", c, "route", "add", self.SUBNET, "via", self.SERVER_V4)
        return self

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        sh("ip", "netns", "del", self.client, check=False)
        sh("ip", "netns", "del", self.server, check=False)
        if self.cgroup is not None:
            self.cgroup.close()

    def exec_args(self, ns: str) -> list[str]:
        """Run in namespace ns; in the client's, also in the lab's cgroup, where the hooks
        are (the pipeline, its tools and the test's clients: the host's sluice would see
        them there)."""
        if ns == self.client:
            return ["ip", "netns", "exec", ns, *LabCgroup.run_in(self.cgroup.leaf)]
        return ["ip", "netns", "exec", ns]

    def start_server(self, *ports: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            self.exec_args(self.server) + [PYTHON, "-m", "tests.support.tools.netserver",
                                           *map(str, ports)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.processes.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def client_run(self, *args: str, timeout: float = 15) -> dict:
        """Run tests/support/tools/netclient.py in the client namespace; its JSON result."""
        result = subprocess.run(
            self.exec_args(self.client) + [PYTHON, "-m", "tests.support.tools.netclient", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def in_client_net(self, host_mounts: bool = False) -> list[str]:
        """The prefix that runs a command in the client's network namespace (and the lab's
        cgroup). `ip netns exec` gives it a mount namespace of its own (a fresh /sys: bpffs
        pins die with the run); host_mounts keeps this machine's, as on a real host, where
        pins outlive a crash."""
        if host_mounts:
            return ["nsenter", f"--net=/run/netns/{self.client}",
                    *LabCgroup.run_in(self.cgroup.leaf)]
        return self.exec_args(self.client)

    def start_pipeline(self, env: dict, log, host_mounts: bool = False,
                       resolved_upstreams: Path | None = None) -> subprocess.Popen:
        """`honcho start` of the real Procfile in the client namespace (no .env read), then
        `sluice wait-ready`; raises with the wait's complaint if the pipeline never gets up.
        resolved_upstreams: a file the pipeline sees as systemd-resolved's list of upstreams
        (/run/systemd/resolve/resolv.conf, in a mount namespace of its own)."""
        empty_env = Path(env["SLUICE_RUN_DIR"]).parent / "empty.env"
        empty_env.write_text("")
        bin_dir = Path(PYTHON).parent
        prefix = self.in_client_net(host_mounts)
        if resolved_upstreams is not None:
            prefix += ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       WITH_RESOLVED_UPSTREAMS, "sh", str(resolved_upstreams)]
        proc = subprocess.Popen(
            prefix + [str(bin_dir / "honcho"), "start", "-f", str(ROOT / "Procfile"), "-e",
                      str(empty_env)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        ready = subprocess.run([str(bin_dir / "sluice"), "wait-ready", "--timeout", "60"],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=70)
        if ready.returncode != 0:
            raise RuntimeError(f"pipeline not ready: {ready.stderr.strip()}")
        return proc

    def spawn_in_client_net(self, args: list[str], env: dict, **kw) -> subprocess.Popen:
        """A process in the client's network namespace but this mount namespace, so its
        pins under /sys/fs/bpf are visible to the test."""
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.client}",
                                 *LabCgroup.run_in(self.cgroup.leaf), *args],
                                cwd=ROOT, env=env, **kw)
        self.processes.append(proc)
        return proc


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(extra)
    return env


class Session:
    """A TCP connection held open by netclient in the client namespace."""

    def __init__(self, lab: Lab, host: str, port: int) -> None:
        self.proc = subprocess.Popen(
            lab.exec_args(lab.client) + [PYTHON, "-m", "tests.support.tools.netclient", "session",
                                         host, str(port), "--timeout", "2"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.processes.append(self.proc)
        self.opened = json.loads(self.proc.stdout.readline() or '{"ok": false}')

    def ping(self) -> bool:
        self.proc.stdin.write("ping\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["ok"]
