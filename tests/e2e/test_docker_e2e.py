"""End to end with Docker from the distribution (docker.io): real containers, enforce mode.

dockerd runs in the lab's client namespace ("the host", where the Procfile runs) with state
of its own under tmp_path, its own process in the lab's cgroup and its containers' cgroups
under it (--cgroup-parent), so the hooks see them and nothing of this machine's. The image
is busybox, imported from the distribution's busybox-static (no registry needed).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.dnsworld import BYSTANDER, POLICY, ZONE, DnsWorld, stop_and_detach
from tests.support.netns import Lab, LabCgroup
from tests.support.pipeline import Pipeline, find
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
IMAGE = "sluice-test/busybox:1"
BUSYBOX = Path("/bin/busybox")


class Docker:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.root = lab, tmp / "docker"
        self.socket = self.root / "docker.sock"
        self.parent = f"/{lab.cgroup.path.name}/docker"  # relative to the hierarchies' roots
        daemon = lab.cgroup.child("docker.service")
        in_host = ["nsenter", f"--net=/run/netns/{lab.client}", *LabCgroup.run_in(daemon)]
        self.log = open(tmp / "dockerd.log", "w")
        # containerd of its own, started and waited for here: dockerd gives the one it would
        # start itself a few seconds only, too few on a loaded machine.
        (self.root / "containerd").mkdir(parents=True)
        (self.root / "containerd.toml").write_text("version = 2\n")
        containerd_socket = self.root / "containerd" / "containerd.sock"
        self.containerd = subprocess.Popen(
            [*in_host, "containerd", "--config", str(self.root / "containerd.toml"),
             "--root", str(self.root / "containerd" / "root"),
             "--state", str(self.root / "containerd" / "state"),
             "--address", str(containerd_socket)], stdout=self.log, stderr=subprocess.STDOUT)
        lab.processes.append(self.containerd)
        self.proc = self.containerd  # until dockerd runs: what close() stops
        wait_for(lambda: containerd_socket.exists() or self.containerd.poll() is not None,
                 "containerd", timeout=120)
        self.proc = subprocess.Popen(
            [*in_host, "dockerd", "--containerd", str(containerd_socket),
             "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "pid"),
             "-H", f"unix://{self.socket}", "--storage-driver", "vfs",
             "--exec-opt", "native.cgroupdriver=cgroupfs", "--cgroup-parent", self.parent,
             "--dns", BYSTANDER, "--bip", "172.31.0.1/24"],
            stdout=self.log, stderr=subprocess.STDOUT)
        lab.processes.append(self.proc)
        try:
            wait_for(lambda: self.proc.poll() is not None or self.run("info", check=False)
                     .returncode == 0, "dockerd", timeout=120)
            assert self.proc.poll() is None, (tmp / "dockerd.log").read_text()[-2000:]
            self.import_busybox(tmp / "rootfs")
        except BaseException:
            self.close()
            raise

    def run(self, *args: str, check: bool = True, timeout: float = 120):
        result = subprocess.run(["docker", "-H", f"unix://{self.socket}", *args],
                                capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def import_busybox(self, rootfs: Path) -> None:
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in ("sh", "nc", "cat"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "-H", f"unix://{self.socket}", "import", "-",
                                   IMAGE], stdin=tar.stdout, capture_output=True, text=True)
        tar.wait()
        assert imported.returncode == 0, imported.stderr

    def container(self, script: str, *options: str) -> tuple[str, str]:
        """Run script in a new container to its end; (its id, its output)."""
        cid = self.run("run", "-d", *options, IMAGE, "sh", "-c", script).stdout.strip()
        self.run("wait", cid, timeout=60)
        out = self.run("logs", cid).stdout + self.run("logs", cid).stderr
        self.run("rm", cid)
        return cid, out

    def close(self) -> None:
        for proc in (self.proc, self.containerd):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        self.log.close()
        for mount in reversed(mounts_under(self.root)):  # a dockerd that died mid-way leaves some
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        # With cgroup v1 controllers mounted beside v2 (hybrid), runc made the parent in
        # each of them too: remove what is left (empty, the containers are gone).
        for mount in cgroup_v1_mounts():
            for directory in (mount / self.parent.strip("/"), mount / self.lab.cgroup.path.name):
                try:
                    directory.rmdir()
                except OSError:
                    pass


def mounts_under(root: Path) -> list[Path]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(line.split()[4])
        if point == root or root in point.parents:
            found.append(point)
    return found


def cgroup_v1_mounts() -> list[Path]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        if rest.split()[0] == "cgroup":
            mounts.append(Path(fields.split()[4]))
    return mounts


@pytest.fixture
def docker(lab, tmp_path):
    if shutil.which("dockerd") is None or not BUSYBOX.exists():
        pytest.fail("dockerd and busybox are needed (./bootstrap test installs docker.io and "
                    "busybox-static)")
    world = DnsWorld(lab, tmp_path, ZONE)
    try:
        daemon = Docker(lab, tmp_path)
        try:
            yield world, daemon
        finally:
            daemon.close()
    finally:
        world.close()


def test_real_docker_containers_dns_goes_through_the_proxy_and_records_name_the_container(
        lab, docker, tmp_path):
    world, daemon = docker
    world.resolv_conf(lab.client, "nameserver 127.0.0.1\n")
    pipeline = Pipeline(lab, tmp_path, POLICY)
    pipeline.env["SLUICE_DNS_UPSTREAM"] = f"{Lab.SERVER_V4}:53"
    pipeline.start()

    # The default bridge: the container asks the resolver Docker gave it (--dns).
    plain, out = daemon.container(
        "cat /etc/resolv.conf; echo ping | nc -w 2 n10.allowed.test 80; "
        "echo ping | nc -w 1 10.203.2.3 80")
    assert f"nameserver {BYSTANDER}" in out and "pong" in out, out
    # A user-defined network: Docker's embedded resolver (127.0.0.11) forwards for it.
    daemon.run("network", "create", "--subnet", "172.31.1.0/24", "sluicenet")
    embedded, out = daemon.container(
        "cat /etc/resolv.conf; echo ping | nc -w 2 n11.allowed.test 80", "--network", "sluicenet")
    assert "nameserver 127.0.0.11" in out and "pong" in out, out
    daemon.run("network", "rm", "sluicenet")
    assert world.asked("bystander") == [], "a container's query went around the proxy"

    def records(cid):
        return [r for r in pipeline.jsonl() if r.get("container") == cid]

    wait_for(lambda: find(records(plain), event_type="connection_allowed")
             and find(records(plain), event_type="connection_blocked")
             and find(records(embedded), event_type="connection_allowed"),
             "the records", timeout=20)
    for cid, name, ip in ((plain, "n10.allowed.test", "10.203.0.11"),
                          (embedded, "n11.allowed.test", "10.203.0.12")):
        [allowed] = find(records(cid), event_type="connection_allowed")
        assert (allowed["dst_ip"], allowed["dst_hostname"], allowed["process"]) == (
            ip, name, "nc")
        assert allowed["pid"] > 0 and allowed["cgroup"] == f"{daemon.parent}/{cid}"
        assert not find(pipeline.jsonl(), event_type="connection_blocked", dst_ip=ip), (
            "the first SYN was dropped")
    [blocked] = find(records(plain), event_type="connection_blocked")[:1]
    assert (blocked["dst_ip"], blocked["process"], blocked["cgroup"]) == (
        "10.203.2.3", "nc", f"{daemon.parent}/{plain}")
    rows = {r["container"] for r in pipeline.rows() if r["container"]}
    assert rows == {plain, embedded}
    stop_and_detach(pipeline)
