"""Private by default: what sluice creates is readable by root alone, or by one group.

The audit trail names every process and destination the host contacted. Directories sluice
creates are 0700 and its files 0600; with SLUICE_GROUP set, directories are 0750 and files
0640, owned by that group, so its members can read the store, the JSONL log and recordings
(never write them). Paths that already exist are left as they are: `sluice doctor` reports
those looser than this (`loose`).

Modes are set explicitly with chmod/fchmod, so the process umask can only narrow them; the
`sluice` command also starts with umask 077, so that anything else it creates (SQLite's
-wal and -shm files follow their database's mode anyway) stays private too.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

UMASK = 0o077


def group_id(group: str) -> int | None:
    """The gid of a SLUICE_GROUP value (a name or a number), None when empty; ValueError
    if no such group exists."""
    group = group.strip()
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ValueError(f"no group named {group!r}") from None


def modes(gid: int | None) -> tuple[int, int]:
    """(directory mode, file mode)."""
    return (0o750, 0o640) if gid is not None else (0o700, 0o600)


def make_dirs(path: Path, gid: int | None) -> None:
    """Create path and its missing parents, each private; existing ones are left alone."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # made meanwhile by another stage: that one set its mode
        own(directory, modes(gid)[0], gid)


def create_file(path: Path, gid: int | None) -> bool:
    """Create path, empty and private, if it does not exist; True when it was created."""
    make_dirs(path.parent, gid)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, modes(gid)[1])
    except FileExistsError:
        return False
    try:
        own(fd, modes(gid)[1], gid)
    finally:
        os.close(fd)
    return True


def open_private(path: Path, flags: int, gid: int | None) -> int:
    """os.open(path, flags | O_CREAT): a file it creates is private, an existing one is
    opened as it is."""
    create_file(path, gid)
    return os.open(path, flags | os.O_CLOEXEC)


def own(target: Path | int, mode: int, gid: int | None) -> None:
    if isinstance(target, int):
        os.fchmod(target, mode)
        if gid is not None:
            os.fchown(target, -1, gid)
    else:
        os.chmod(target, mode)
        if gid is not None:
            os.chown(target, -1, gid)


def loose(path: Path, gid: int | None) -> str | None:
    """Why an existing path is open to more than root (and SLUICE_GROUP), or None."""
    try:
        info = path.stat()
    except OSError:
        return None
    allowed = modes(gid)[0 if stat.S_ISDIR(info.st_mode) else 1]
    if gid is not None and info.st_gid != gid:
        allowed &= 0o700  # a group other than SLUICE_GROUP gets nothing
    mode = stat.S_IMODE(info.st_mode)
    if not mode & ~allowed & 0o077:
        return None
    return f"{path} is mode {mode:04o}, more open than {allowed:04o}"
