"""`sluice import`: cargowall or sluice NDJSON audit logs into the store, idempotently.

Each line is one audit record with the seed's JSON field names (reference §2.5): any RFC 3339
timestamp offset and 0-9 fractional digits, omitted fields meaning empty, fields sluice does
not store (cargowall's step fields) ignored; cargowall's `container_id` is the container.
Flags are kept as written: the log's own normalization is the truth about its run.

Every valid line is stored; every other line is rejected on its own, with its line number
and reason (the rest of the file goes on): lines longer than MAX_LINE_BYTES or nested deeper
than MAX_DEPTH (pipeline/limited.py), lines that are not JSON objects, unknown event types,
addresses that do not parse and values outside the audit record's ranges (the same checks
as the persist inbox: AuditEvent.problem).

Importing is idempotent: a line with an `event_id` (sluice's own logs) keeps it; a line
without one gets an id derived from its bytes and from how many identical lines came before
it in the file, so the same file imported again, or a copy of it, adds nothing, while two
identical records of one log both count. Lines without `host` get the host given.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .. import limited
from .records import AuditEvent, parse_timestamp
from ..errors import StoreError
from .store import AuditStore, StoreRejected

BATCH = 5_000
MAX_LINE_BYTES = 1 << 20  # a record is a few hundred bytes
MAX_DEPTH = 8             # a record nests 2 levels (its cname_chain)
ALREADY_STORED = "already stored"
TEXT_FIELDS = ("event_type", "src_ip", "dst_ip", "dst_hostname", "protocol", "process",
               "matched_rule", "auto_allowed_type", "event_id", "host", "cgroup", "container")
NUMBER_FIELDS = ("dst_port", "pid", "packets")
FLAG_FIELDS = ("mid_stream", "would_deny", "blocked")

Rejected = Callable[[int, str], None]  # (line number, reason): told of each rejected line


class Skip(ValueError):
    """Why one line is not stored; str() is the reason, counted per kind."""


@dataclasses.dataclass
class ImportReport:
    lines: int = 0
    stored: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_line: dict[str, int] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, line_no: int) -> None:
        self.skipped[reason] += 1
        self.first_line.setdefault(reason, line_no)

    def lines_out(self) -> list[str]:
        out = [f"read {self.lines} line(s): stored {self.stored}, skipped "
               f"{sum(self.skipped.values())}"]
        for reason, count in self.skipped.most_common():
            line_no = self.first_line.get(reason)
            where = f" (first at line {line_no})" if line_no else ""
            if count:
                out.append(f"  skipped {count}: {reason}{where}")
        return out


def _checked(document: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = document[name]
    # bool is an int in Python, but not a number in JSON's sense here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Skip(f"{name} is not {what}")
    return value


def event_from(document: Any, derived_id: str, host: str) -> AuditEvent:
    """The record of one decoded line; Skip with the reason if it cannot be one."""
    if not isinstance(document, dict):
        raise Skip("not a JSON object")
    for required in ("timestamp", "event_type"):
        if not document.get(required):
            raise Skip(f"no {required}")
    try:
        timestamp = parse_timestamp(_checked(document, "timestamp", str, "text"))
    except ValueError:
        raise Skip("timestamp is not RFC 3339") from None
    fields: dict[str, Any] = {"event_id": derived_id, "host": host}
    for name in TEXT_FIELDS:
        if name in document:
            fields[name] = _checked(document, name, str, "text")
    if "container" not in fields and "container_id" in document:
        fields["container"] = _checked(document, "container_id", str, "text")
    for name in NUMBER_FIELDS:
        if name in document:
            fields[name] = _checked(document, name, int, "a whole number")
    for name in FLAG_FIELDS:
        if name in document:
            fields[name] = _checked(document, name, bool, "true or false")
    if "cname_chain" in document:
        chain = _checked(document, "cname_chain", list, "a list")
        if not all(isinstance(hop, str) for hop in chain):
            raise Skip("cname_chain is not a list of names")
        fields["cname_chain"] = chain
    event = AuditEvent(timestamp=timestamp, **fields)
    reason = event.problem()
    if reason:
        raise Skip(reason)
    return event


def read_events(f: BinaryIO, host: str, report: ImportReport,
                rejected: Rejected = lambda line, reason: None) -> Iterator[tuple[int, AuditEvent]]:
    """(line number, record) of an NDJSON file; each line that is not one is counted in
    report and told to rejected."""
    seen: collections.Counter = collections.Counter()
    for line in limited.json_lines(f, max_line_bytes=MAX_LINE_BYTES, max_depth=MAX_DEPTH):
        report.lines += 1
        digest = hashlib.sha256(line.raw).hexdigest()[:32]
        seen[digest] += 1
        derived = f"ndjson-{digest}" + (f"-{seen[digest] - 1}" if seen[digest] > 1 else "")
        try:
            if line.problem:
                raise Skip(line.problem)
            yield line.number, event_from(line.document, derived, host)
        except Skip as skip:
            report.skip(str(skip), line.number)
            if line.problem != "blank line":
                rejected(line.number, line.detail or str(skip))


def import_file(path: Path, db: str, host: str,
                rejected: Rejected = lambda line, reason: None,
                gid: int | None = None) -> ImportReport:
    report = ImportReport()
    store = AuditStore(db, gid=gid)
    try:
        store.migrate()
        with _open(path) as f:
            batch: list[tuple[int, AuditEvent]] = []
            for item in read_events(f, host, report, rejected):
                batch.append(item)
                if len(batch) >= BATCH:
                    _store(store, batch, report, rejected)
                    batch = []
            _store(store, batch, report, rejected)
    finally:
        store.close()
    return report


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as err:
        raise StoreError(f"cannot read {path}: {err.strerror or err}") from None


def _store(store: AuditStore, batch: list[tuple[int, AuditEvent]], report: ImportReport,
           rejected: Rejected) -> None:
    try:
        stored = len(store.insert([event for _, event in batch]))
    except StoreRejected:
        # One record the database refuses would sink the batch: store the others one by one.
        for line, event in batch:
            _store_one(store, line, event, report, rejected)
        return
    report.stored += stored
    report.skipped[ALREADY_STORED] += len(batch) - stored


def _store_one(store: AuditStore, line: int, event: AuditEvent, report: ImportReport,
               rejected: Rejected) -> None:
    try:
        stored = len(store.insert([event]))
    except StoreRejected as err:
        report.skip("refused by the database", line)
        rejected(line, f"refused by the database: {err}")
        return
    report.stored += stored
    report.skipped[ALREADY_STORED] += 1 - stored
