"""Requirement checks shared by `sluice doctor` and capture's start-up (same lines)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from ..settings import Settings

MIN_KERNEL = (5, 8)  # ring buffer, socket cookies in cgroup sock_addr and TC programs
FIX_BOOTSTRAP = "run ./bootstrap"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    failed: str = "missing"  # the word for a failed check

    def line(self) -> str:
        if self.ok:
            return f"ok       {self.name}: {self.detail}"
        return f"{self.failed:8} {self.name}: {self.detail} -> {self.fix}"


def kernel_version(release: str) -> tuple[int, int]:
    parts = release.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_kernel() -> Check:
    release = platform.release()
    ok = kernel_version(release) >= MIN_KERNEL
    return Check("kernel", ok, release, f"sluice needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]}+")


def check_bpf_syscall() -> Check:
    libc = ctypes.CDLL(None, use_errno=True)
    # BPF_PROG_LOAD with no attr: anything but ENOSYS/EPERM means we may use bpf().
    rc = libc.syscall(321, 5, None, 0)
    err = ctypes.get_errno() if rc < 0 else 0
    ok = err in (7, 14, 22)  # E2BIG, EFAULT, EINVAL: the call reached the verifier
    return Check("bpf syscall", ok, "available" if ok else os.strerror(err),
                 "a kernel with CONFIG_BPF_SYSCALL, run as root (or CAP_BPF + CAP_NET_ADMIN)")


def check_btf() -> Check:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    return Check("BTF", ok, "/sys/kernel/btf/vmlinux" if ok else "no /sys/kernel/btf/vmlinux",
                 "a kernel built with CONFIG_DEBUG_INFO_BTF")


def check_clsact() -> Check:
    """clsact and cls_bpf: loaded, built in, or available as modules."""
    modules = Path(f"/lib/modules/{platform.release()}")
    builtin = modules / "modules.builtin"
    found = []
    for name in ("sch_ingress", "cls_bpf"):
        if (Path("/sys/module") / name).exists():
            found.append(f"{name} loaded")
        elif builtin.exists() and f"/{name}.ko" in builtin.read_text():
            found.append(f"{name} built in")
        elif list(modules.glob(f"kernel/net/sched/{name}.ko*")):
            found.append(f"{name} module")
    if len(found) == 2:
        return Check("clsact", True, ", ".join(found))
    if not builtin.exists():
        # No module tree to inspect (custom kernels): the first attach tells for sure.
        return Check("clsact", True, "no module list for this kernel; assumed built in")
    return Check("clsact", False, "sch_ingress or cls_bpf not available",
                 "a kernel with CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF")


def check_cgroup2() -> Check:
    from .loader import cgroup2_mounts

    mounts = cgroup2_mounts()
    ok = bool(mounts)
    return Check("cgroup v2", ok, str(mounts[0]) if ok else "not mounted here",
                 "capture mounts it under SLUICE_RUN_DIR, or set SLUICE_CGROUP")


def check_bpffs(settings: Settings) -> Check:
    from .loader import BPF_FS_MAGIC, _statfs_type

    where = settings.bpf_dir.parent
    ok = _statfs_type(where) == BPF_FS_MAGIC
    return Check("bpffs", ok, f"{where} is bpffs" if ok else f"{where} is not bpffs",
                 "capture mounts it (mount -t bpf bpf /sys/fs/bpf)")


def check_headers() -> Check:
    build = Path(f"/lib/modules/{platform.release()}/build")
    ok = (build / "include").is_dir() and (build / "arch").is_dir()
    return Check("kernel headers", ok, str(build.resolve()) if ok else f"no {build}",
                 FIX_BOOTSTRAP + " (installs the nearest linux-headers and links them)")


def check_bcc() -> Check:
    # Found, not imported: importing maps bcc's compiler into this process for good, and
    # capture loads the program in a child process precisely so that it never holds it.
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.submodule_search_locations:
        return Check("bcc", False, "python module bcc not found",
                     FIX_BOOTSTRAP + " (apt install python3-bpfcc, linked into the venv)")
    return Check("bcc", True, Path(list(spec.submodule_search_locations)[0]).as_posix())


def check_privileges() -> Check:
    ok = os.geteuid() == 0
    return Check("privileges", ok, "root" if ok else f"euid {os.geteuid()}",
                 "run as root (loading BPF and attaching filters needs it)")


def private_paths(settings: Settings) -> list[Path]:
    """What sluice writes that holds the audit trail, and the directories holding it."""
    from ..audit.store import sqlite_file

    files = []
    database = sqlite_file(settings.db)
    if database is not None:
        files += [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    if settings.audit_log is not None:
        files.append(settings.audit_log)
    if settings.record is not None:
        files.append(settings.record)
        files += sorted(settings.record.parent.glob(f"{settings.record.name}.*"))
    paths = [settings.run_dir, settings.journal_dir] + files + [f.parent for f in files]
    return list(dict.fromkeys(p for p in paths if p.exists()))


def check_private(settings: Settings) -> Check:
    """The audit trail is readable by root (and SLUICE_GROUP) only."""
    from ..private import loose

    gid = settings.gid
    problems = [why for why in (loose(p, gid) for p in private_paths(settings)) if why]
    if not problems:
        who = f"root and group {settings.group}" if gid is not None else "root"
        return Check("private files", True, f"audit store, logs and run dir readable by {who}")
    mode = "640, directories 750" if gid is not None else "600, directories 700"
    return Check("private files", False, "; ".join(problems),
                 f"chmod them (files {mode}) or set SLUICE_GROUP for readers", "loose")


def run_checks(settings: Settings) -> list[Check]:
    return [check_kernel(), check_bpf_syscall(), check_btf(), check_clsact(), check_cgroup2(),
            check_bpffs(settings), check_headers(), check_bcc(), check_privileges(),
            check_private(settings)]


# Checks whose failure stops capture (bpffs and cgroup2 are mounted by capture itself).
def blocking_failures(settings: Settings) -> list[Check]:
    return [c for c in (check_kernel(), check_privileges(), check_bpf_syscall(), check_headers(),
                        check_bcc()) if not c.ok]
