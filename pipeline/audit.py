"""Audit records: the seed's AuditEventType and AuditEvent, their normalization, their JSONL form.

An AuditEvent is created once (policy, dns, the start-up scan), normalized there, and travels
to persist as an `audit_records` message (schemas/audit_records.json). Field names are the
seed's JSON names; sluice adds `packets`, `event_id` and `host`.

The JSONL form is what cargowall writes (reference §2.6), so its NDJSON consumers read it:
compact, keys in field order, the seed's omit-empty rules and the Go encoder's escaping.
Timestamps are always UTC with a `Z`. AuditLogger is the seed's JSONL writer; unlike cargowall
it appends (a restart never wipes the previous log) and repairs a line cut short by a crash.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from .errors import StoreError
from .wire import WireRecord, register

log = logging.getLogger("sluice.audit")


class AuditEventType(str, enum.Enum):
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


@register
@dataclasses.dataclass(slots=True)
class AuditEvent(WireRecord):
    KIND = "audit_records"

    timestamp: int            # UTC nanoseconds since the epoch; 0 = "now" at normalization
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
    cname_chain: list[str] = dataclasses.field(default_factory=list)
    mid_stream: bool = False
    would_deny: bool = False  # true in audit mode: would have been denied
    blocked: bool = False     # true in enforce mode: actually blocked
    packets: int = 1          # packets this record stands for (kernel flood aggregation)
    event_id: str = ""        # unique: a retried write never duplicates a row
    host: str = ""


def normalize(event: AuditEvent, audit_mode: bool, now_ns: int) -> AuditEvent:
    """The seed's AuditLogger.LogEvent rules, applied once where a record is created."""
    if event.timestamp == 0:
        event.timestamp = now_ns
    if event.event_type not in FLAG_EXEMPT_TYPES:
        event.would_deny = audit_mode
        event.blocked = not audit_mode
    return event


def new_event_id(now_ns: int) -> str:
    """A unique id that sorts by creation time: SQL indexes on it stay append-mostly."""
    return f"{now_ns:016x}{os.urandom(8).hex()}"


_INT64 = 1 << 63


def invalid_reason(event: AuditEvent) -> str | None:
    """Why a record cannot be stored as the seed's types describe it (None if it can)."""
    if not event.event_type:
        return "empty event_type"
    if not 0 <= event.timestamp < _INT64:
        return "timestamp out of range"
    if not 0 <= event.dst_port <= 0xFFFF:
        return "dst_port out of range"
    if not 0 <= event.pid <= 0xFFFFFFFF:
        return "pid out of range"
    if not 0 <= event.packets < _INT64:
        return "packets out of range"
    return None


# ---------------------------------------------------------------- timestamps

_NS = 1_000_000_000


@functools.lru_cache(maxsize=4096)
def _second_text(seconds: int) -> str:
    # Records come in bursts within the same second: format each second once.
    t = time.gmtime(seconds)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")


def format_timestamp(ns: int) -> str:
    """RFC 3339 UTC with nanoseconds, trailing fractional zeros trimmed (Go's RFC3339Nano)."""
    seconds, fraction = divmod(ns, _NS)
    if not fraction:
        return _second_text(seconds) + "Z"
    # The fraction is non-zero, so the strip stops at one of its digits.
    return f"{_second_text(seconds)}.{fraction:09d}".rstrip("0") + "Z"


def sql_timestamp(ns: int) -> str:
    """Fixed width, 9 fractional digits: sorts as text in SQLite and PostgreSQL."""
    seconds, fraction = divmod(ns, _NS)
    return f"{_second_text(seconds)}.{fraction:09d}Z"


_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:[Zz]|([+-])(\d\d):(\d\d))")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def parse_timestamp(text: str) -> int:
    """RFC 3339 with any offset and 0-9 fractional digits -> UTC nanoseconds."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r:.60}")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    offset = datetime.timedelta(0)
    if sign:
        offset = datetime.timedelta(hours=int(off_h), minutes=int(off_m))
        offset = -offset if sign == "-" else offset
    try:
        moment = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute),
                                   int(second), tzinfo=datetime.timezone(offset))
    except ValueError as err:
        raise ValueError(f"bad RFC 3339 timestamp {text!r:.60}: {err}") from None
    delta = moment - _EPOCH
    return (delta.days * 86400 + delta.seconds) * _NS + int((fraction or "0").ljust(9, "0"))


# ---------------------------------------------------------------- JSONL form

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# What Go's encoder writes differently from Python's: HTML-sensitive characters and the JS
# line separators are escaped, and so is each lone surrogate (what Python makes of an invalid
# UTF-8 byte), as Go writes an invalid byte: the escape of U+FFFD.
_GO_SPECIAL = re.compile("[<>&\u2028\u2029\ud800-\udfff]")
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
               "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _go_escape(match: re.Match) -> str:
    return _GO_ESCAPES.get(match.group(), "\\ufffd")


def to_json_line(event: AuditEvent) -> str:
    """One compact JSON object and a newline, as cargowall's encoder writes it."""
    e = event
    # Key order is insertion order; the seed's omitempty decides which keys exist.
    d = {"timestamp": format_timestamp(e.timestamp), "event_type": e.event_type}
    if e.src_ip:
        d["src_ip"] = e.src_ip
    if e.dst_ip:
        d["dst_ip"] = e.dst_ip
    if e.dst_hostname:
        d["dst_hostname"] = e.dst_hostname
    if e.dst_port:
        d["dst_port"] = e.dst_port
    if e.protocol:
        d["protocol"] = e.protocol
    if e.process:
        d["process"] = e.process
    if e.pid:
        d["pid"] = e.pid
    if e.matched_rule:
        d["matched_rule"] = e.matched_rule
    if e.auto_allowed_type:
        d["auto_allowed_type"] = e.auto_allowed_type
    if e.cname_chain:
        d["cname_chain"] = e.cname_chain
    if e.mid_stream:
        d["mid_stream"] = True
    d["would_deny"] = e.would_deny
    d["blocked"] = e.blocked
    if e.packets > 1:
        d["packets"] = e.packets
    if e.event_id:
        d["event_id"] = e.event_id
    if e.host:
        d["host"] = e.host
    line = _encode(d)
    # Plain substring tests are far cheaper than the regex on the usual all-ASCII line.
    if "<" in line or ">" in line or "&" in line or not line.isascii():
        line = _GO_SPECIAL.sub(_go_escape, line)
    return line + "\n"


# ---------------------------------------------------------------- the writer

SYNC_INTERVAL_S = 1.0
_TAIL_CHUNK = 64 * 1024


class AuditLogger:
    """The seed's JSONL audit writer: appends one line per record, never truncates."""

    def __init__(self, path: Path | None, audit_mode: bool, *,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self._audit_mode = audit_mode
        self._clock = clock
        self._lock = threading.Lock()  # the log_* methods may be called from several threads
        self._fd: int | None = None
        self._closed = False
        self._last_sync: float | None = None
        if path is not None:
            self._open()

    # -- file handling

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise StoreError(f"cannot open audit log {self.path}: {err.strerror or err}") from None
        try:
            self._repair_tail(fd)
        except OSError as err:
            os.close(fd)
            raise StoreError(f"cannot repair audit log {self.path}: {err.strerror or err}") from None
        self._fd = fd

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

    def _sync(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self._last_sync is not None and now - self._last_sync <= SYNC_INTERVAL_S:
            return
        self._last_sync = now  # also after a failure: warn at most once a second
        try:
            os.fsync(self._fd)
        except OSError as err:
            # The lines are written (in the page cache); writing them again would duplicate them.
            log.warning("cannot sync audit log %s: %s", self.path, err.strerror or err)

    def write(self, events: Iterable[AuditEvent]) -> None:
        """Append already-normalized events with one write; StoreError if that fails."""
        if self.path is None:
            return
        data = "".join(map(to_json_line, events)).encode()
        if not data:
            return
        with self._lock:
            if self._closed:
                raise StoreError(f"audit log {self.path} is closed")
            if self._fd is None:
                self._open()
            view, done = memoryview(data), 0
            try:
                while done < len(data):
                    done += os.write(self._fd, view[done:])
            except OSError as err:
                # A failed write may leave part of a line: reopening repairs the tail.
                self._drop_fd()
                raise StoreError(f"cannot write audit log {self.path}: "
                                 f"{err.strerror or err}") from None
            self._sync()

    def reopen(self) -> None:
        """Start a new file at path (SIGHUP after logrotate moved the old one away)."""
        with self._lock:
            if self.path is None or self._closed:
                return
            if self._fd is not None:
                self._sync(force=True)
                self._drop_fd()
            self._open()

    def close(self) -> None:
        """Sync and close; closing twice is fine."""
        with self._lock:
            if self._fd is not None:
                self._sync(force=True)
                self._drop_fd()
            self._closed = True

    # -- the seed's API

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
        """Both flags are `not allowed`, whatever the mode."""
        self.log_event(AuditEvent(
            0, AuditEventType.EXISTING_CONNECTION.value, dst_ip=ip, dst_hostname=hostname,
            matched_rule=matched_rule, auto_allowed_type=auto_allowed_type,
            would_deny=not allowed, blocked=not allowed))

    def log_protocol_blocked(self, src_ip: str, dst_ip: str, hostname: str, protocol: str,
                             process: str, pid: int) -> None:
        self.log_event(AuditEvent(
            0, AuditEventType.PROTOCOL_BLOCKED.value, src_ip=src_ip, dst_ip=dst_ip,
            dst_hostname=hostname, protocol=protocol, process=process, pid=pid))
