"""Audit records: the seed's AuditEventType and AuditEvent, their normalization, their JSONL form.

An AuditEvent is created once (policy, dns, the start-up scan), normalized there, and travels
to persist as an `audit_records` message (schemas/audit_records.json). Field names are the
seed's JSON names; sluice adds `packets`, `event_id`, `host`, and the owner's `cgroup` and
`container` (pipeline/containers.py).

The JSONL form is what cargowall writes (reference §2.6), so its NDJSON consumers read it:
compact, keys in field order, the seed's omit-empty rules and the Go encoder's escaping.
Timestamps are always UTC with a `Z`. AuditLogger is the seed's JSONL writer; unlike cargowall
it appends (a restart never wipes the previous log) and repairs a line cut short by a crash.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from .. import private
from ..errors import StoreError
from .timestamps import format_timestamp, parse_timestamp, sql_timestamp  # noqa: F401
from ..wire import (ADDRESS_OR_EMPTY, EVENT_ID, HOST, I64, NAME, NAMES, PROCESS, SHORT, TEXT, U16,
                   U32, Limit, WireRecord, limited, register)

log = logging.getLogger("sluice.audit")


class AuditEventType(enum.StrEnum):
    CONNECTION_BLOCKED = "connection_blocked"
    CONNECTION_ALLOWED = "connection_allowed"
    CONNECTION_LATE_ALLOWED = "connection_late_allowed"
    PROTOCOL_BLOCKED = "protocol_blocked"
    DNS_BLOCKED = "dns_blocked"
    EXISTING_CONNECTION = "existing_connection"

    def is_connection_allowed(self) -> bool:
        """An allow outcome for a TCP/UDP connection: allowed, or late-allowed on retry."""
        return self in (AuditEventType.CONNECTION_ALLOWED, AuditEventType.CONNECTION_LATE_ALLOWED)


# Types whose would_deny/blocked flags are whatever their creator set (reference §2.5).
FLAG_EXEMPT_TYPES = frozenset({
    "connection_allowed", "connection_late_allowed", "existing_connection",
    "step_boundary", "container_attribution", "cgroup_would_block",
})


# Every type a record may have: sluice's own and those cargowall logs carry.
KNOWN_EVENT_TYPES = (*(t.value for t in AuditEventType), "step_boundary",
                     "container_attribution", "cgroup_would_block")
if TYPE_CHECKING:  # what the checker needs to know; at run time, the limited wire types
    EVENT_TYPE = str
    CONTAINER = str
else:
    EVENT_TYPE = limited(str, Limit(choices=KNOWN_EVENT_TYPES))
    CONTAINER = limited(str, Limit(max_len=128))


@register
class AuditEvent(WireRecord):
    KIND = "audit_records"
    VERSION = 3  # 2: seq; 3: cgroup and container

    timestamp: I64  # UTC nanoseconds since the epoch; 0 = "now" at normalization
    event_type: EVENT_TYPE
    src_ip: ADDRESS_OR_EMPTY = ""
    dst_ip: ADDRESS_OR_EMPTY = ""
    dst_hostname: NAME = ""
    dst_port: U16 = 0
    protocol: SHORT = ""
    process: PROCESS = ""
    pid: U32 = 0
    matched_rule: NAME = ""
    auto_allowed_type: SHORT = ""
    cname_chain: NAMES = msgspec.field(default_factory=list)
    mid_stream: bool = False
    would_deny: bool = False  # true in audit mode: would have been denied
    blocked: bool = False     # true in enforce mode: actually blocked
    packets: I64 = 1  # packets this record stands for (flood aggregation)
    event_id: EVENT_ID = ""  # unique: a retry never duplicates a row
    host: HOST = ""
    seq: I64 = 0  # capture's journal number of the kernel record, 0 if none
    cgroup: TEXT = ""  # the process's cgroup v2 path, "" if unknown
    container: CONTAINER = ""  # the container id in it, "" if none


def normalize(event: AuditEvent, audit_mode: bool, now_ns: int) -> AuditEvent:
    """The seed's AuditLogger.LogEvent rules, applied once where a record is created."""
    if event.timestamp == 0:
        event.timestamp = now_ns
    if event.event_type not in FLAG_EXEMPT_TYPES:
        event.would_deny = audit_mode
        event.blocked = not audit_mode
    return event


def existing_connection_record(ip: str, hostname: str, matched_rule: str, allowed: bool,
                               auto_allowed_type: str) -> AuditEvent:
    """A connection open before sluice started (the seed's LogExistingConnection): both
    flags are `not allowed`, whatever the mode. The policy stage's start-up scan logs these."""
    return AuditEvent(
        0, AuditEventType.EXISTING_CONNECTION.value, dst_ip=ip, dst_hostname=hostname,
        matched_rule=matched_rule, auto_allowed_type=auto_allowed_type,
        would_deny=not allowed, blocked=not allowed)


def new_event_id(now_ns: int) -> str:
    """A unique id that sorts by creation time: SQL indexes on it stay append-mostly."""
    return f"{now_ns:016x}{os.urandom(8).hex()}"


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Batch work without the cycle collector's passes.

    Writing a batch of 8,192 records makes tens of thousands of short-lived tuples, lists and
    structs, none of them in a cycle: reference counting frees them all, yet the collector
    would start about a hundred passes per batch to look, a tenth of the write path's time
    in benchmarks/persist_throughput.py (a fifth in a scan). Whatever garbage with cycles a
    batch does leave is collected by the first pass after it. Process-wide: another thread's
    work in the meantime only runs without passes too.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# ---------------------------------------------------------------- JSONL form

class _JsonLine(msgspec.Struct, omit_defaults=True):
    """The JSON object of one record: the seed's field order and omit-empty rules."""

    timestamp: str
    event_type: str
    src_ip: str = ""
    dst_ip: str = ""
    dst_hostname: str = ""
    dst_port: int = 0
    protocol: str = ""
    process: str = ""
    pid: int = 0
    matched_rule: str = ""
    auto_allowed_type: str = ""
    cname_chain: list[str] = []
    mid_stream: bool = False
    would_deny: bool | None = None  # never None: always written, like Go's plain bools
    blocked: bool | None = None
    packets: int = 1                # written only above 1
    event_id: str = ""
    host: str = ""
    cgroup: str = ""
    container: str = ""


_encoder = msgspec.json.Encoder()
# What Go's encoder escapes and msgspec does not. These characters only ever occur inside
# JSON strings, so replacing them in the encoded bytes is exact.
_GO_BYTES = ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"),
             ("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029"))


def _line(e: AuditEvent) -> _JsonLine:
    return _JsonLine(format_timestamp(e.timestamp), e.event_type, e.src_ip, e.dst_ip,
                     e.dst_hostname, e.dst_port, e.protocol, e.process, e.pid, e.matched_rule,
                     e.auto_allowed_type, e.cname_chain, e.mid_stream, e.would_deny, e.blocked,
                     e.packets if e.packets > 1 else 1, e.event_id, e.host, e.cgroup,
                     e.container)


def json_lines(events: Sequence[AuditEvent]) -> bytes:
    """One compact JSON object and a newline per record, as cargowall's encoder writes them."""
    try:
        data = _encoder.encode_lines([_line(e) for e in events])
    except UnicodeEncodeError:
        # A lone surrogate (an undecodable byte in a process name): Go writes U+FFFD's
        # escape there. Rare enough for the plain encoder, record by record.
        return "".join(map(_slow_line, events)).encode()
    if not data.isascii() or b"<" in data or b">" in data or b"&" in data:
        for special, escape in _GO_BYTES:
            data = data.replace(special, escape)
    return data


def to_json_line(event: AuditEvent) -> str:
    """One record's line (json_lines of one)."""
    return json_lines([event]).decode()


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_GO_SPECIAL = re.compile("[<>&\u2028\u2029\ud800-\udfff]")
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
               "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _go_escape(match: re.Match) -> str:
    return _GO_ESCAPES.get(match.group(), "\\ufffd")


def _slow_line(e: AuditEvent) -> str:
    """The same line through the json module, which tolerates lone surrogates."""
    line = _encode({k: v for k, v in msgspec.structs.asdict(_line(e)).items()
                    if k in _ALWAYS or v != _DEFAULTS[k]})
    return _GO_SPECIAL.sub(_go_escape, line) + "\n"


_DEFAULTS = msgspec.structs.asdict(_JsonLine("", ""))
_ALWAYS = ("timestamp", "event_type", "would_deny", "blocked")


# ---------------------------------------------------------------- the writer

SYNC_INTERVAL_S = 1.0
_TAIL_CHUNK = 64 * 1024


class AuditLogger:
    """The seed's JSONL audit writer: appends one line per record, never truncates."""

    def __init__(self, path: Path | None, audit_mode: bool, *,
                 clock: Callable[[], int] = time.time_ns, gid: int | None = None) -> None:
        self.path = path
        self._gid = gid  # SLUICE_GROUP's, for a file this creates (pipeline/private.py)
        self._audit_mode = audit_mode
        self._clock = clock
        self._lock = threading.Lock()  # the log_* methods may be called from several threads
        self._fd: int | None = None
        self._closed = False
        self._last_sync: float | None = None
        if path is not None:
            self._open(path)

    # -- file handling

    def _open(self, path: Path) -> int:
        """Open path (self.path) for appending, its tail repaired; the descriptor."""
        try:
            fd = private.open_private(path, os.O_RDWR | os.O_APPEND, self._gid)
        except OSError as err:
            raise StoreError(f"cannot open audit log {self.path}: {err.strerror or err}") from None
        try:
            self._repair_tail(fd)
        except OSError as err:
            os.close(fd)
            raise StoreError(
                f"cannot repair audit log {self.path}: {err.strerror or err}") from None
        self._fd = fd
        return fd

    def _repair_tail(self, fd: int) -> None:
        """Cut a line a crash left half-written, so the next line starts on its own."""
        size = end = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        keep = 0
        while end > 0:
            start = max(0, end - _TAIL_CHUNK)
            newline = os.pread(fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        os.ftruncate(fd, keep)
        log.warning("audit log %s ended with a partial line: cut %d byte(s)", self.path,
                    size - keep)

    def _drop_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass  # the descriptor is gone either way; nothing more to save
            self._fd = None

    def _sync(self, fd: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self._last_sync is not None and now - self._last_sync <= SYNC_INTERVAL_S:
            return
        self._last_sync = now  # also after a failure: warn at most once a second
        try:
            os.fsync(fd)
        except OSError as err:
            # The lines are written (in the page cache); writing them again would duplicate them.
            log.warning("cannot sync audit log %s: %s", self.path, err.strerror or err)

    def write(self, events: Sequence[AuditEvent]) -> None:
        """Append already-normalized events with one write; StoreError if that fails."""
        if self.path is None:
            return
        with collector_paused():
            data = json_lines(events)
        if not data:
            return
        with self._lock:
            if self._closed:
                raise StoreError(f"audit log {self.path} is closed")
            fd = self._fd if self._fd is not None else self._open(self.path)
            view, done = memoryview(data), 0
            try:
                while done < len(data):
                    done += os.write(fd, view[done:])
            except OSError as err:
                # A failed write may leave part of a line: reopening repairs the tail.
                self._drop_fd()
                raise StoreError(f"cannot write audit log {self.path}: "
                                 f"{err.strerror or err}") from None
            self._sync(fd)

    def last_event_id(self) -> str:
        """The event id of the file's last line ("" when empty, unreadable or without one)."""
        if self.path is None or self._fd is None:
            return ""
        size = os.fstat(self._fd).st_size
        tail = os.pread(self._fd, min(size, _TAIL_CHUNK), max(0, size - _TAIL_CHUNK))
        lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
        try:
            value = json.loads(lines[-1]).get("event_id", "")
        except (ValueError, AttributeError):
            return ""
        return value if isinstance(value, str) else ""

    def reopen(self) -> None:
        """Start a new file at path (SIGHUP after logrotate moved the old one away)."""
        with self._lock:
            if self.path is None or self._closed:
                return
            if self._fd is not None:
                self._sync(self._fd, force=True)
                self._drop_fd()
            self._open(self.path)

    def close(self) -> None:
        """Sync and close; closing twice is fine."""
        with self._lock:
            if self._fd is not None:
                self._sync(self._fd, force=True)
                self._drop_fd()
            self._closed = True

    # -- the seed's API. The pipeline writes through write() (persist, in batches) records
    # that policy, dns and the start-up scan built and normalized; these are thin adapters
    # over the same pieces for a library user: build the record (outcome.decide's fields,
    # existing_connection_record), normalize() it with this logger's mode, write() it.
    # tests/unit/test_audit.py checks that they write what the pipeline writes.

    def set_audit_mode(self, audit_mode: bool) -> None:
        self._audit_mode = audit_mode

    def is_audit_mode(self) -> bool:
        return self._audit_mode

    def log_event(self, event: AuditEvent) -> None:
        """Normalize with this logger's audit flag and clock, then append."""
        self.write([normalize(event, self._audit_mode, self._clock())])

    def log_connection_allowed(self, src_ip: str, dst_ip: str, hostname: str, dst_port: int,
                               process: str, pid: int, auto_allowed_type: str,
                               protocol: str) -> None:
        self.log_event(AuditEvent(
            0, AuditEventType.CONNECTION_ALLOWED.value, src_ip=src_ip, dst_ip=dst_ip,
            dst_hostname=hostname, dst_port=dst_port, protocol=protocol, process=process,
            pid=pid, auto_allowed_type=auto_allowed_type))

    def log_connection_blocked(self, src_ip: str, dst_ip: str, hostname: str, dst_port: int,
                               process: str, pid: int, protocol: str) -> None:
        self.log_event(AuditEvent(
            0, AuditEventType.CONNECTION_BLOCKED.value, src_ip=src_ip, dst_ip=dst_ip,
            dst_hostname=hostname, dst_port=dst_port, protocol=protocol, process=process,
            pid=pid))

    def log_connection_late_allowed(self, src_ip: str, dst_ip: str, hostname: str,
                                    matched_rule: str, dst_port: int, process: str, pid: int,
                                    protocol: str) -> None:
        self.log_event(AuditEvent(
            0, AuditEventType.CONNECTION_LATE_ALLOWED.value, src_ip=src_ip, dst_ip=dst_ip,
            dst_hostname=hostname, dst_port=dst_port, protocol=protocol, process=process,
            pid=pid, matched_rule=matched_rule))

    def log_dns_blocked(self, domain: str) -> None:
        self.log_event(AuditEvent(0, AuditEventType.DNS_BLOCKED.value, dst_hostname=domain))

    def log_existing_connection(self, ip: str, hostname: str, matched_rule: str, allowed: bool,
                                auto_allowed_type: str) -> None:
        self.log_event(existing_connection_record(ip, hostname, matched_rule, allowed,
                                                  auto_allowed_type))

    def log_protocol_blocked(self, src_ip: str, dst_ip: str, hostname: str, protocol: str,
                             process: str, pid: int) -> None:
        self.log_event(AuditEvent(
            0, AuditEventType.PROTOCOL_BLOCKED.value, src_ip=src_ip, dst_ip=dst_ip,
            dst_hostname=hostname, protocol=protocol, process=process, pid=pid))
