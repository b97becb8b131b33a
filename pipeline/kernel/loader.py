"""Compile, load, pin, attach and detach the kernel side (bcc in a child process, libbpf).

bcc is imported only in pipeline/kernel/compile.py, a child process load_classifier starts.
What one instance attached is written to <run_dir>/attachment.json, so `sluice detach` can
undo it after the stage is gone.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


from . import libbpf, redirect
from .maps import unreported
from ..errors import KernelError
from ..settings import Settings

log = logging.getLogger("sluice.capture")

BPF_SOURCE_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
BPF_SOURCE = BPF_SOURCE_DIR / "sluice.c"

FILTER_PRIO = 0x51CE        # distinctive, so teardown removes exactly our filter
FILTER_HANDLE = 1
EGRESS_PROGRAM = "sluice_egress"  # the classifier; tc shows the filter by this name
CLAIM_PROGRAM = "sluice_claim_tail"  # run by capture to claim a quiet flow's tail
BPF_F_ALLOW_MULTI = 2       # never displace other cgroup programs (systemd's)
BPF_FS_MAGIC = 0xCAFE4A11



@dataclass(frozen=True)
class Hook:
    function: str     # in bpf/sluice.c
    attach_type: int  # the kernel's enum bpf_attach_type
    redirect: bool    # part of the DNS redirect (without it answers would not match)


# The sock_addr hooks record socket owners and send DNS to the proxy (connect, sendmsg) and
# make its answers come from the address asked (recvmsg, getpeername); the cgroup egress hook
# records the owners of flows that reach the classifier forwarded (containers).
HOOKS = (Hook("sluice_connect4", 10, True), Hook("sluice_connect6", 11, True),
         Hook("sluice_sendmsg4", 14, True), Hook("sluice_sendmsg6", 15, True),
         Hook("sluice_recvmsg4", 19, True), Hook("sluice_recvmsg6", 20, True),
         Hook("sluice_getpeername4", 29, True), Hook("sluice_getpeername6", 30, True),
         Hook("sluice_sock_egress", 1, False))
SOCK_EGRESS = 1  # BPF_CGROUP_INET_EGRESS: a cgroup_skb program, the others are sock_addr
V6_HOOKS = (11, 15)  # the IPv6 socket-owner hooks (connect6, sendmsg6)

AGG_WINDOW_NS = 1_000_000_000
MIDSTREAM_WINDOW_NS = 10_000_000_000
FLOW_ENTRIES = 65_536  # map_flows: about 12 MB of kernel memory


def cflags(bpf_dir: Path, ringbuf_pages: int) -> list[str]:
    """Knobs for bpf/sluice.c, all as -D flags (never string replacement of the source)."""
    return [
        f"-I{BPF_SOURCE_DIR}",
        f'-DSLUICE_PIN_DIR="{bpf_dir}"',
        f"-DSLUICE_RINGBUF_PAGES={ringbuf_pages}",
        f"-DSLUICE_AGG_WINDOW_NS={AGG_WINDOW_NS}ULL",
        f"-DSLUICE_MIDSTREAM_WINDOW_NS={MIDSTREAM_WINDOW_NS}ULL",
        f"-DSLUICE_FLOW_ENTRIES={FLOW_ENTRIES}",
        "-w",  # kernel headers are noisy under bcc's clang; our own code compiles clean
    ]


def printable_source(settings: Settings) -> str:
    """The exact source and flags capture would load (for `sluice print-bpf`)."""
    flags = cflags(settings.bpf_dir, settings.ringbuf_pages)
    header = "\n".join(f"// cflag: {flag}" for flag in flags)
    return f"{header}\n// file: {BPF_SOURCE}\n{BPF_SOURCE.read_text()}"


# ---------------------------------------------------------------- filesystems

def _statfs_type(path: Path) -> int | None:
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buf = StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def ensure_bpffs(bpf_dir: Path) -> None:
    """Make bpf_dir a directory on bpffs, mounting bpffs where it is missing (ip netns exec)."""
    mount_point = bpf_dir.parent
    mount_point.mkdir(parents=True, exist_ok=True)
    if _statfs_type(mount_point) != BPF_FS_MAGIC:
        run_quiet(["mount", "-t", "bpf", "bpf", str(mount_point)],
                  f"cannot mount bpffs on {mount_point}")
        log.info("mounted bpffs on %s", mount_point)
    bpf_dir.mkdir(mode=0o700, exist_ok=True)


CGROUP2_MAGIC = 0x63677270
STANDARD_CGROUP2 = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))  # v2, hybrid


def cgroup2_mounts(whole: bool = False) -> list[Path]:
    """cgroup2 mount points here; whole=True: only those showing the whole hierarchy."""
    mounts = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            parts = line.split(" - ")
            fields = parts[0].split()
            if len(parts) == 2 and parts[1].split()[0] == "cgroup2" and (
                    not whole or fields[3] == "/"):
                mounts.append(Path(fields[4]))
    return mounts


def cgroup_root(settings: Settings) -> Path:
    """The cgroup2 hierarchy's root where the system mounts it, else a mount of our own under
    the run dir (`ip netns exec` hides /sys/fs/cgroup): never some other program's mount,
    which could be unmounted under us."""
    mounts = set(cgroup2_mounts(whole=True))
    for standard in STANDARD_CGROUP2:
        if standard in mounts:
            return standard
    private = settings.run_dir / "cgroup2"
    private.mkdir(parents=True, exist_ok=True)
    if _statfs_type(private) != CGROUP2_MAGIC:
        run_quiet(["mount", "-t", "cgroup2", "none", str(private)], "cannot mount cgroup2")
    return private


def cgroup_dir(settings: Settings) -> Path:
    """SLUICE_CGROUP, else the cgroup2 root: where the hooks go."""
    if settings.cgroup:
        return Path(settings.cgroup)
    return cgroup_root(settings)


def run_quiet(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise KernelError(f"{what}: {result.stderr.strip() or result.returncode}")


# ---------------------------------------------------------------- interface

def default_route_interface(route_table: str) -> str:
    """Interface of the IPv4 default route, from /proc/net/route text."""
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
            return fields[0]
    return ""


def ipv6_disabled(interface: str) -> bool | None:
    """Whether IPv6 is switched off on the interface; None where the host has no IPv6."""
    try:
        return Path(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6").read_text().strip() == "1"
    except OSError:
        return None if not Path("/proc/sys/net/ipv6").exists() else False


def egress_interface(settings: Settings) -> str:
    if settings.interface:
        return settings.interface
    name = default_route_interface(Path("/proc/net/route").read_text())
    if not name:
        raise KernelError("no default route: set SLUICE_INTERFACE to the egress interface")
    return name


# ---------------------------------------------------------------- attachment record

@dataclass
class Attachment:
    interface: str = ""
    qdisc_created: bool = False
    filter_attached: bool = False
    cgroup: str = ""
    hooks: list[dict] = field(default_factory=list)  # {"prog_id": int, "attach_type": int}
    bpf_dir: str = ""
    redirect_addresses: list[str] = field(default_factory=list)  # added to lo by capture

    @staticmethod
    def path(run_dir: Path) -> Path:
        return run_dir / "attachment.json"

    def save(self, run_dir: Path) -> None:
        tmp = self.path(run_dir).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, self.path(run_dir))

    @classmethod
    def load(cls, run_dir: Path) -> Attachment | None:
        try:
            return cls(**json.loads(cls.path(run_dir).read_text()))
        except (OSError, ValueError, TypeError):
            return None


# ---------------------------------------------------------------- load

MAPS = ("map_events", "map_config", "map_counters", "map_flows", "map_parked",
        "map_dns_redirect")
# Pins of maps this sluice no longer has, removed when it loads (an upgrade leaves none).
RETIRED_PINS = ("map_overflow",)
COMPILE_TIMEOUT_S = 120
MAX_FDS = 32


class Classifier:
    """The loaded kernel side as file descriptors: the egress program, the hook programs and
    the maps capture reads. Compiled in a child process (pipeline/kernel/compile.py), so no
    compiler stays in this one."""

    def __init__(self, fds: dict[str, int]) -> None:
        self.fds = fds
        self.egress_fd = fds[EGRESS_PROGRAM]
        self.claim_fd = fds[CLAIM_PROGRAM]
        self.hooks = [(fds[hook.function], hook) for hook in HOOKS]

    def map_fd(self, name: str) -> int:
        return self.fds[name]

    def cleanup(self) -> None:
        """Close every fd: programs the kernel still uses (an attached filter) stay loaded."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def load_classifier(settings: Settings) -> Classifier:
    ensure_bpffs(settings.bpf_dir)
    for name in RETIRED_PINS:
        (settings.bpf_dir / name).unlink(missing_ok=True)
    if settings.ringbuf_pages & (settings.ringbuf_pages - 1):
        raise KernelError(f"SLUICE_RINGBUF_PAGES={settings.ringbuf_pages}: must be a power of two")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.kernel.compile", str(theirs.fileno()),
             str(settings.bpf_dir), str(settings.ringbuf_pages)],
            pass_fds=[theirs.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=BPF_SOURCE_DIR.parent)
        theirs.close()
        ours.settimeout(COMPILE_TIMEOUT_S)
        try:
            message, fds, _flags, _addr = socket.recv_fds(ours, 1 << 16, MAX_FDS)
        except (TimeoutError, OSError) as err:
            child.kill()
            raise KernelError(f"cannot load {BPF_SOURCE.name}: no answer from the compiler "
                              f"({err})") from None
        _, stderr = child.communicate(timeout=COMPILE_TIMEOUT_S)
    finally:
        ours.close()
    return _classifier(message, fds, stderr.decode(errors="replace"))


def _classifier(message: bytes, fds: list[int], stderr: str) -> Classifier:
    try:
        names = json.loads(message)
    except ValueError:
        names = None
    if not isinstance(names, list) or len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        detail = names.get("error") if isinstance(names, dict) else (
            stderr.strip().splitlines()[-1:] or ["the compiler exited without a word"])[0]
        if "No module named 'bcc'" in str(detail):
            detail = "bcc is missing: install python3-bpfcc (./bootstrap does)"
        raise KernelError(f"cannot load {BPF_SOURCE.name}: {detail} (run `sluice doctor`; a "
                          "stale SLUICE_BPF_DIR from an older build is removed by `sluice "
                          "detach`)")
    return Classifier(dict(zip(names, fds, strict=True)))


def adopted_sizes(classifier: Classifier, settings: Settings) -> tuple[int, list[str]]:
    """The ring buffer's size in bytes as the kernel made it, and how the maps' sizes differ
    from this run's settings and build. Maps pinned by an earlier run (an enforce-mode stop
    keeps them, so that the classifier never stops) are used as they were made, until
    `sluice detach` removes them: reading the ring buffer by the setting instead failed, or
    with a smaller setting read it at the wrong places."""
    ring = libbpf.max_entries(classifier.map_fd("map_events"))
    flows = libbpf.max_entries(classifier.map_fd("map_flows"))
    differences = []
    if ring != settings.ringbuf_pages * 4096:
        differences.append(f"the ring buffer holds {ring // 4096} page(s), not "
                           f"SLUICE_RINGBUF_PAGES={settings.ringbuf_pages}")
    if flows != FLOW_ENTRIES:
        differences.append(f"map_flows holds {flows:,} flows, not this build's {FLOW_ENTRIES:,}")
    return ring, differences


# ---------------------------------------------------------------- tc filter

def attach_filter(interface: str, prog_fd: int) -> bool:
    """Put the classifier on egress (direct-action: without it a drop verdict would be read
    as a class id, a silent fail-open); returns whether we created clsact."""
    index = _ifindex(interface)
    try:
        created = libbpf.tc_hook_create(index)
        libbpf.tc_attach(index, prog_fd, FILTER_HANDLE, FILTER_PRIO)
    except OSError as err:
        raise KernelError(f"{interface}: {err.strerror}") from None
    return created


def detach_filter(interface: str, remove_qdisc: bool) -> bool:
    """Remove our filter (and clsact if we created it); False when it was not there."""
    try:
        index = _ifindex(interface)
    except KernelError:
        return False
    removed = libbpf.tc_detach(index, FILTER_HANDLE, FILTER_PRIO)
    if remove_qdisc:
        libbpf.tc_hook_destroy(index)
    return removed


def _ifindex(interface: str) -> int:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise KernelError(f"no interface named {interface!r} (SLUICE_INTERFACE)") from None


# ---------------------------------------------------------------- cgroup hooks

def attach_hooks(classifier: Classifier,
                 cgroup: Path) -> tuple[list[dict], list[tuple[Hook, str]]]:
    """Attach every cgroup hook; returns what is attached and, for each hook that is not,
    the hook and one line saying why. A missing hook costs process names or the DNS
    redirect: the caller decides."""
    attached, failures = [], []
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for prog_fd, hook in classifier.hooks:
            try:
                libbpf.prog_attach(prog_fd, fd, hook.attach_type, BPF_F_ALLOW_MULTI)
                attached.append({"prog_id": libbpf.prog_id(prog_fd),
                                 "attach_type": hook.attach_type})
            except OSError as err:
                failures.append((hook, f"cgroup hook {hook.function} not attached on "
                                       f"{cgroup}: {err.strerror or err}"))
    finally:
        os.close(fd)
    return attached, failures


def detach_hooks(cgroup: str, hooks: list[dict]) -> int:
    """Detach hooks by program id; works after the loading process is gone."""
    if not hooks:
        return 0
    try:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return 0
    detached = 0
    try:
        for hook in hooks:
            try:
                prog_fd = libbpf.prog_fd_by_id(hook["prog_id"])
            except ProcessLookupError:
                continue
            try:
                detached += libbpf.prog_detach(prog_fd, cg_fd, hook["attach_type"])
            finally:
                os.close(prog_fd)
    finally:
        os.close(cg_fd)
    return detached


# ---------------------------------------------------------------- whole instance

def remove_pins(bpf_dir: Path) -> int:
    if not bpf_dir.is_dir():
        return 0
    removed = 0
    for pin in bpf_dir.iterdir():
        pin.unlink()
        removed += 1
    bpf_dir.rmdir()
    return removed


def detach_instance(settings: Settings) -> list[str]:
    """Remove this instance's filter, hooks and pins; say what was removed."""
    done = []
    record = Attachment.load(settings.run_dir)
    interface = record.interface if record else settings.interface
    if interface and detach_filter(interface, record.qdisc_created if record else False):
        done.append(f"filter {EGRESS_PROGRAM} on {interface}")
    if record and (count := detach_hooks(record.cgroup, record.hooks)):
        done.append(f"{count} cgroup hook(s) on {record.cgroup}")
    if record and (addresses := redirect.remove_addresses(record.redirect_addresses)):
        done.append(f"DNS redirect address(es) {', '.join(addresses)} on lo")
    bpf_dir = Path(record.bpf_dir) if record and record.bpf_dir else settings.bpf_dir
    discarded = unreported(bpf_dir)  # with the filter off, nothing adds to it now
    if count := remove_pins(bpf_dir):
        done.append(f"{count} pinned map(s) in {bpf_dir}")
        if discarded:
            done.append(f"with them, not reported (no capture had journaled it): {discarded}")
    if record:
        Attachment.path(settings.run_dir).unlink(missing_ok=True)
    private_cgroup = settings.run_dir / "cgroup2"
    if private_cgroup.is_dir():
        subprocess.run(["umount", str(private_cgroup)], capture_output=True)
        shutil.rmtree(private_cgroup, ignore_errors=True)
    return done
