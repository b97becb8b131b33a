"""What a batch of new audit rows adds to the rollup tables (pure: no SQL, no clock).

The store (pipeline/store.py) keeps small aggregate tables in step with `audit_events`, in the
same transaction as the rows, so the summary views read them instead of scanning every row:

* `late_keys`: per host and (dst_ip, dst_port, protocol), the latest late-allow's timestamp.
* `activity_minutes` / `activity_days`: per host and UTC minute / day, a count per event type
  and of superseded blocks (TIMELINE_COUNTS).
* `destination_days`: per host, UTC day, event type, address, port, protocol, destination,
  process and matched rule: events, first and last seen, and the same three for the rows
  that are counted (every row but a superseded block). `destinations` holds the same over
  all time (no day), so the all-time views read one row per destination, not one a day.

A `connection_blocked` row is superseded when the latest late-allow of its host and key is at
or after it (README "Queries"). So the writer classifies each new block against the latest
late-allow known after the batch, and a late-allow that moves that time forward supersedes
stored blocks: the store finds those rows (Flip) and `flip` turns them from counted into
superseded in the same deltas. Rows arrive in any order and a row stored twice is never seen
here twice (the store passes only rows that became new).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, NamedTuple, Sequence

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
# destination_days key columns, then its value columns.
# In the order the all-time views group by: blocked_destinations reads in key order.
GROUP_KEY = ("host", "day", "destination", "dst_port", "protocol", "process", "event_type",
             "dst_ip", "matched_rule")
GROUP_VALUES = ("events", "first_seen", "last_seen", "counted", "counted_first",
                "counted_last")

LateKey = tuple  # (host, dst_ip, dst_port, protocol)


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


Flip = Row  # a stored block that a new late-allow supersedes


@dataclasses.dataclass
class Deltas:
    """Additions to each rollup table, keyed by its primary key."""

    minutes: dict[tuple, list[int]] = dataclasses.field(default_factory=dict)
    days: dict[tuple, list[int]] = dataclasses.field(default_factory=dict)
    # destination_days (keyed by GROUP_KEY) and destinations (the same without day):
    # [events, first, last, counted, counted_first, counted_last]; counted times may be None.
    groups: dict[tuple, list] = dataclasses.field(default_factory=dict)
    totals: dict[tuple, list] = dataclasses.field(default_factory=dict)
    # Groups that lost counted rows: their counted_first/last are read again from the rows.
    refresh: set[tuple] = dataclasses.field(default_factory=set)


def latest_late_allows(rows: Iterable[Row]) -> dict[LateKey, str]:
    """The latest late-allow of each key in rows."""
    latest: dict[LateKey, str] = {}
    for host, ts, kind, ip, _, port, protocol, *_ in rows:
        if kind == LATE_ALLOWED and ts > latest.get((host, ip, port, protocol), ""):
            latest[(host, ip, port, protocol)] = ts
    return latest


def block_keys(rows: Iterable[Row]) -> set[LateKey]:
    return {(host, ip, port, protocol)
            for host, _, kind, ip, _, port, protocol, *_ in rows if kind == BLOCKED}


def aggregate(rows: Iterable[Row], late: Mapping[LateKey, str]) -> Deltas:
    """The deltas of new rows, given the latest late-allow of each key after the batch."""
    # Two dict operations per row; rows of a flood share few groups, so everything after
    # this loop works on groups, not rows.
    minutes: dict[tuple, int] = {}
    fine: dict[tuple, list] = {}
    for row in rows:
        host, ts, kind, ip, name, port, protocol, process, rule = row
        superseded = False
        if kind == BLOCKED and late:
            superseded = late.get((host, ip, port, protocol), "") >= ts
        bucket = (host, ts[:16], kind, superseded)
        minutes[bucket] = minutes.get(bucket, 0) + 1
        key = (host, ts[:10], name or ip, port, protocol, process, kind, ip, rule, superseded)
        group = fine.get(key)
        if group is None:
            fine[key] = [1, ts, ts]
        else:
            group[0] += 1
            if ts < group[1]:
                group[1] = ts
            elif ts > group[2]:
                group[2] = ts
    deltas = Deltas()
    for (host, minute, kind, superseded), n in minutes.items():
        slot = TYPE_SLOTS.get(kind)
        for table, bucket in ((deltas.minutes, (host, minute + "Z")),
                              (deltas.days, (host, minute[:10]))):
            counts = table.get(bucket)
            if counts is None:
                counts = table[bucket] = [0] * len(TIMELINE_COUNTS)
            counts[0] += n
            if slot:
                counts[slot] += n
            if superseded:
                counts[_SUPERSEDED] += n
    for (*key, superseded), (n, first, last) in fine.items():
        value = [n, first, last, 0, None, None] if superseded else [n, first, last, n, first, last]
        _merge(deltas.groups, tuple(key), value)
        _merge(deltas.totals, total_key(key), value)
    return deltas


def _merge(table: dict[tuple, list], key: tuple, value: list) -> None:
    old = table.get(key)
    if old is None:
        table[key] = value.copy()
        return
    old[0] += value[0]
    old[3] += value[3]
    for i, later in ((1, False), (2, True), (4, False), (5, True)):
        if value[i] is not None and (old[i] is None or (value[i] > old[i]) == later):
            old[i] = value[i]


def total_key(group: Sequence) -> tuple:
    """The destinations key of a destination_days key (the same without the day)."""
    return (group[0], *group[2:])


def flip(deltas: Deltas, flipped: Iterable[Flip]) -> None:
    """Turn stored blocks that a new late-allow supersedes from counted into superseded."""
    for f in flipped:
        for table, bucket in ((deltas.minutes, (f.host, f.timestamp[:16] + "Z")),
                              (deltas.days, (f.host, f.timestamp[:10]))):
            counts = table.setdefault(bucket, [0] * len(TIMELINE_COUNTS))
            counts[_SUPERSEDED] += 1
        key = (f.host, f.timestamp[:10], f.dst_hostname or f.dst_ip, f.dst_port, f.protocol,
               f.process, BLOCKED, f.dst_ip, f.matched_rule)
        # The row is stored in these groups already: its time moves neither first nor last.
        value = [0, f.timestamp, f.timestamp, -1, None, None]
        _merge(deltas.groups, key, value)
        _merge(deltas.totals, total_key(key), value)
        deltas.refresh.add(key)
