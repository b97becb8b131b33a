"""What a batch of new audit rows adds to the rollup tables (pure: no SQL, no clock).

The store (pipeline/audit/store.py) keeps small aggregate tables in step with `audit_events`, in the
same transaction as the rows or, for persist on SQLite while records keep coming, in a later
one (AuditStore.catch_up, rows in the order they were stored; the views add the rows not
counted yet), so the summary views read them instead of scanning every row:

* `late_keys`: per host and (dst_ip, dst_port, protocol), the latest late-allow's timestamp.
* `activity_minutes` / `activity_days`: per host and UTC minute / day, a count per event type
  and of superseded blocks (TIMELINE_COUNTS).
* `destination_minutes`: per host, UTC minute, address, port, protocol, event type,
  destination, process and matched rule (MINUTE_KEY): events, first and last seen, and the
  same three over the rows that are counted (every row but a superseded block).
  `destinations` holds the same over all time (TOTAL_KEY, no minute), so the all-time views
  read one row per destination.

`gather` passes over a batch once, grouping its rows per minute group (a flood has few);
`aggregate` works on those groups. A `connection_blocked` row is superseded when the latest
late-allow of its host and key is at or after it (README "Queries"). So the writer classifies
each new block against the latest late-allow known after its batch (a group that the
late-allow falls within is split row by row), and a late-allow that moves that time forward
supersedes counted blocks already stored. The store finds those in destination_minutes (an
index leads from host, dst_ip, dst_port and protocol to them): a minute group whose counted
rows all lie at or before the late-allow flips whole; only the group of the late-allow's own
minute can straddle it, and the store counts that one's rows. `flip` turns what was found
into deltas.
Rows arrive in any order, and a row stored twice is never seen here twice (the store passes
only rows that became new).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

BLOCKED = "connection_blocked"
LATE_ALLOWED = "connection_late_allowed"
# activity_* columns after host and the bucket, in this order.
TIMELINE_COUNTS = ("events", "connection_allowed", "connection_late_allowed",
                   "connection_blocked", "superseded", "protocol_blocked", "dns_blocked",
                   "existing_connection")
_SUPERSEDED = TIMELINE_COUNTS.index("superseded")
# The event types with a column of their own; any other type counts only in events.
TYPE_SLOTS = {name: i for i, name in enumerate(TIMELINE_COUNTS)
              if name not in ("events", "superseded")}
# destination_minutes: minute first, so a window is one range and new groups are appended.
MINUTE_KEY = ("host", "minute", "dst_ip", "dst_port", "protocol", "event_type", "destination",
              "process", "matched_rule")
# destinations: in the order the all-time views group by (blocked_destinations reads it in
# key order).
TOTAL_KEY = ("host", "destination", "dst_port", "protocol", "process", "event_type", "dst_ip",
             "matched_rule")
# Their values, in this order in Deltas.groups and Deltas.totals (the upserts' order too).
GROUP_VALUES = ("events", "counted", "first_seen", "counted_first", "last_seen",
                "counted_last")

LateKey = tuple[str, str, int, str]  # (host, dst_ip, dst_port, protocol)
# MINUTE_KEY and TOTAL_KEY values.
MinuteKey = tuple[str, str, str, int, str, str, str, str, str]
TotalKey = tuple[str, str, int, str, str, str, str, str]
Bucket = tuple[str, str]  # (host, minute or day)
# GROUP_VALUES: counts and times in one list, updated in place (one allocation per group).
GroupValues = list[Any]


class Row(NamedTuple):
    """The audit_events columns a rollup reads, timestamp in its fixed-width text form."""

    host: str
    timestamp: str
    event_type: str
    dst_ip: str
    dst_hostname: str
    dst_port: int
    protocol: str
    process: str
    matched_rule: str


class Flipped(NamedTuple):
    """A stored minute group of blocks, some or all of whose counted rows are superseded now."""

    key: MinuteKey            # its MINUTE_KEY values
    rows: int                 # counted rows that are superseded now
    counted_first: str | None  # what stays counted (None: nothing)
    counted_last: str | None


@dataclasses.dataclass
class Deltas:
    """Additions to each rollup table, keyed by its primary key."""

    minutes: dict[Bucket, list[int]] = dataclasses.field(default_factory=dict)
    days: dict[Bucket, list[int]] = dataclasses.field(default_factory=dict)
    # destination_minutes and destinations: GROUP_VALUES; the counted times may be None.
    groups: dict[MinuteKey, GroupValues] = dataclasses.field(default_factory=dict)
    totals: dict[TotalKey, GroupValues] = dataclasses.field(default_factory=dict)
    # destinations groups that lost counted rows: their counted first and last are read
    # again from destination_minutes once it is written.
    refresh: set[TotalKey] = dataclasses.field(default_factory=set)


def total_key(minute_key: MinuteKey) -> TotalKey:
    """The destinations key of a destination_minutes key."""
    host, _, ip, port, protocol, kind, destination, process, rule = minute_key
    return (host, destination, port, protocol, process, kind, ip, rule)


@dataclasses.dataclass
class Batch:
    """New rows in one pass: their groups, and what classifying their blocks needs."""

    rows: list[Row]
    groups: dict[MinuteKey, GroupValues]  # minute without its "Z" -> [rows, first, last]
    late: dict[LateKey, str]   # the latest late-allow of each key among the rows
    blocks: set[LateKey]       # the keys of the rows' blocks


def gather(rows: list[Row]) -> Batch:
    # One dict operation per row; rows of a flood share few groups, so everything after this
    # loop works on groups, not rows.
    groups: dict[MinuteKey, GroupValues] = {}
    late: dict[LateKey, str] = {}
    for host, ts, kind, ip, name, port, protocol, process, rule in rows:
        key = (host, ts[:16], ip, port, protocol, kind, name or ip, process, rule)
        group = groups.get(key)
        if group is None:
            groups[key] = [1, ts, ts]
        else:
            group[0] += 1
            if ts < group[1]:
                group[1] = ts
            elif ts > group[2]:
                group[2] = ts
        if kind == LATE_ALLOWED and ts > late.get((host, ip, port, protocol), ""):
            late[(host, ip, port, protocol)] = ts
    blocks = {(k[0], k[2], k[3], k[4]) for k in groups if k[5] == BLOCKED}
    return Batch(rows, groups, late, blocks)


def _split(batch: Batch, key: MinuteKey, late: str) -> tuple[int, str | None, str | None]:
    """(superseded rows, first and last counted time) of a group of blocks that a late-allow
    falls within: its rows are looked at one by one."""
    host, minute, ip, port, protocol, kind, destination, process, rule = key
    counted = sorted(ts for h, ts, k, i, name, p, proto, proc, r in batch.rows
                     if ts > late and ts[:16] == minute and k == kind and (h, i, p, proto) ==
                     (host, ip, port, protocol) and (proc, r, name or i) ==
                     (process, rule, destination))
    rows = batch.groups[key][0]
    if not counted:
        return rows, None, None
    return rows - len(counted), counted[0], counted[-1]


def aggregate(batch: Batch, late: Mapping[LateKey, str]) -> Deltas:
    """The deltas of new rows, given the latest late-allow of each key after the batch."""
    deltas = Deltas()
    groups, totals = deltas.groups, deltas.totals
    # (host, minute, event type) -> [rows, superseded]
    per_minute: dict[tuple[str, str, str], list[int]] = {}
    for key, (n, first, last) in batch.groups.items():
        host, minute, ip, port, protocol, kind, destination, process, rule = key
        superseded, counted_first, counted_last = 0, first, last
        if kind == BLOCKED and late:
            latest = late.get((host, ip, port, protocol))
            if latest is not None and latest >= first:
                if latest >= last:
                    superseded, counted_first, counted_last = n, None, None
                else:
                    superseded, counted_first, counted_last = _split(batch, key, latest)
        counts = per_minute.get((host, minute, kind))
        if counts is None:
            per_minute[(host, minute, kind)] = [n, superseded]
        else:
            counts[0] += n
            counts[1] += superseded
        value = [n, n - superseded, first, counted_first, last, counted_last]
        groups[(host, minute + "Z", ip, port, protocol, kind, destination, process, rule)] = value
        total = (host, destination, port, protocol, process, kind, ip, rule)  # total_key
        if total in totals:
            _merge(totals[total], value)
        else:
            totals[total] = value.copy()
    for (host, minute, kind), (n, superseded) in per_minute.items():
        slot = TYPE_SLOTS.get(kind)
        for table, bucket in ((deltas.minutes, (host, minute + "Z")),
                              (deltas.days, (host, minute[:10]))):
            counts = table.get(bucket)
            if counts is None:
                counts = table[bucket] = [0] * len(TIMELINE_COUNTS)
            counts[0] += n
            if slot:
                counts[slot] += n
            counts[_SUPERSEDED] += superseded
    return deltas


def _merge(old: GroupValues, value: GroupValues) -> None:
    old[0] += value[0]
    old[1] += value[1]
    for i, later in ((2, False), (3, False), (4, True), (5, True)):
        if value[i] is not None and (old[i] is None or (value[i] > old[i]) == later):
            old[i] = value[i]


def flip(deltas: Deltas, flipped: Iterable[Flipped]) -> None:
    """Count stored blocks that a new late-allow supersedes as superseded, not as blocks.

    The minute groups themselves are set by the store (their counted first and last are
    known only there); this adds what follows for the other tables.
    """
    for f in flipped:
        host, minute = f.key[:2]
        for table, bucket in ((deltas.minutes, (host, minute)), (deltas.days, (host, minute[:10]))):
            counts = table.setdefault(bucket, [0] * len(TIMELINE_COUNTS))
            counts[_SUPERSEDED] += f.rows
        total = total_key(f.key)
        # The group is stored already; "~" and "" never win its first/last comparisons.
        value = [0, -f.rows, "~", None, "", None]
        if total in deltas.totals:
            _merge(deltas.totals[total], value)
        else:
            deltas.totals[total] = value
        deltas.refresh.add(total)
