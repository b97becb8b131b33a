"""The report's facts, read from the store's views and rollups (README "Queries").

Without a window every section is one read of a summary view (`blocked_destinations`,
`late_allowed`, `dns_blocked_names`, `timeline`), which read the rollups. With a window
(`--since`, or the run `sluice down` ends) counts and first/last times must be the window's
alone: whole UTC minutes after the window's first minute come from `destination_minutes_all`
(the rollup, a range of its key, and the rows it does not count yet), and the first, partial
minute from the per-record views (`audit_events_counted`, `audit_events_classified`) for its
rows at or after the start only (the timestamp index keeps that to those rows); `timeline` is
read by its minute. So a report of the last week reads a week of rollup minutes and at most
a minute of rows (and the rows a burst has left for the rollups, until they catch up).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

import sqlalchemy as sa

from ..audit.records import sql_timestamp
from ..errors import StoreError
from ..audit.store import open_readonly


@dataclasses.dataclass(frozen=True)
class Blocked:
    destination: str      # hostname, else address
    port: int             # 0 for a protocol block
    protocol: str
    attempts: int
    first_seen: str
    last_seen: str
    processes: tuple[str, ...]

    @property
    def key(self) -> str:
        """`name:port` / `address:port` ([v6]:port), as the expected-blocks file lists it."""
        return destination_key(self.destination, self.port)


@dataclasses.dataclass(frozen=True)
class LateAllowed:
    destination: str
    dst_ip: str
    port: int
    protocol: str
    matched_rule: str
    count: int
    first_seen: str
    last_seen: str
    processes: tuple[str, ...]

    @property
    def key(self) -> str:
        return destination_key(self.destination, self.port)


@dataclasses.dataclass(frozen=True)
class Refused:
    name: str
    attempts: int
    first_seen: str
    last_seen: str


@dataclasses.dataclass(frozen=True)
class Minute:
    minute: str           # 2026-01-01T10:00Z
    allowed: int
    blocked: int
    late_allowed: int
    dns_blocked: int


@dataclasses.dataclass(frozen=True)
class Facts:
    blocked: list[Blocked]
    late_allowed: list[LateAllowed]
    refused: list[Refused]
    timeline: list[Minute]


def destination_key(destination: str, port: int) -> str:
    return f"[{destination}]:{port}" if ":" in destination else f"{destination}:{port}"


_BLOCK_TYPES = "('connection_blocked', 'protocol_blocked')"
_MINUTE_NS = 60_000_000_000
_BLOCKED_VIEW = """SELECT destination, port, protocol, attempts, first_seen, last_seen, processes
FROM blocked_destinations WHERE host = :host"""
_BLOCKED_ROWS = """SELECT destination, dst_port, protocol, process, COUNT(*),
       MIN(timestamp), MAX(timestamp)
FROM audit_events_counted
WHERE counted_block = 1 AND host = :host AND timestamp >= :since AND timestamp < :next_minute
GROUP BY destination, dst_port, protocol, process"""
_BLOCKED_MINUTES = f"""SELECT destination, dst_port, protocol, process, SUM(counted),
       MIN(counted_first), MAX(counted_last)
FROM destination_minutes_all
WHERE host = :host AND minute > :minute AND event_type IN {_BLOCK_TYPES} AND counted > 0
GROUP BY destination, dst_port, protocol, process"""
_LATE_VIEW = """SELECT destination, dst_ip, port, protocol, matched_rule, late_allows,
       first_seen, last_seen, processes
FROM late_allowed WHERE host = :host"""
_LATE_ROWS = """SELECT destination, dst_ip, dst_port, protocol, matched_rule, process,
       COUNT(*), MIN(timestamp), MAX(timestamp)
FROM audit_events_classified
WHERE event_type = 'connection_late_allowed' AND host = :host AND timestamp >= :since
  AND timestamp < :next_minute
GROUP BY destination, dst_ip, dst_port, protocol, matched_rule, process"""
_LATE_MINUTES = """SELECT destination, dst_ip, dst_port, protocol, matched_rule, process,
       SUM(events), MIN(first_seen), MAX(last_seen)
FROM destination_minutes_all
WHERE host = :host AND minute > :minute AND event_type = 'connection_late_allowed'
GROUP BY destination, dst_ip, dst_port, protocol, matched_rule, process"""
_REFUSED_VIEW = """SELECT name, attempts, first_seen, last_seen
FROM dns_blocked_names WHERE host = :host"""
_REFUSED_ROWS = """SELECT destination, '', COUNT(*), MIN(timestamp), MAX(timestamp)
FROM audit_events_classified
WHERE event_type = 'dns_blocked' AND host = :host AND timestamp >= :since
  AND timestamp < :next_minute
GROUP BY destination"""
_REFUSED_MINUTES = """SELECT destination, '', SUM(events), MIN(first_seen), MAX(last_seen)
FROM destination_minutes_all
WHERE host = :host AND minute > :minute AND event_type = 'dns_blocked'
GROUP BY destination"""
_TIMELINE = """SELECT minute, allowed, blocked, late_allowed, dns_blocked
FROM timeline WHERE host = :host AND minute >= :minute ORDER BY minute"""


def _window(since_ns: int) -> dict[str, str]:
    """The query parameters of a window starting at since_ns: its first (partial) minute."""
    since = sql_timestamp(since_ns)
    return {"since": since, "minute": since[:16] + "Z",
            "next_minute": sql_timestamp((since_ns // _MINUTE_NS + 1) * _MINUTE_NS)}


def read_facts(url: str, host: str, since_ns: int | None) -> Facts:
    """Every section of the report for host, over all its rows or those at or after since."""
    engine = open_readonly(url)
    params = {"host": host, **(_window(since_ns) if since_ns is not None else {"minute": ""})}
    try:
        with engine.connect() as conn:
            def rows(*statements: str) -> list:
                return [row for sql in statements
                        for row in conn.execute(sa.text(sql), params).fetchall()]

            if since_ns is None:
                blocked = [Blocked(d, p, proto, n, first, last, _split(processes))
                           for d, p, proto, n, first, last, processes in rows(_BLOCKED_VIEW)]
                late = [LateAllowed(d, ip, p, proto, rule, n, first, last, _split(processes))
                        for d, ip, p, proto, rule, n, first, last, processes in rows(_LATE_VIEW)]
                refused = [Refused(*row) for row in rows(_REFUSED_VIEW)]
            else:
                blocked = [Blocked(*row) for row in _fold(rows(_BLOCKED_ROWS, _BLOCKED_MINUTES), 3)]
                late = [LateAllowed(*row) for row in _fold(rows(_LATE_ROWS, _LATE_MINUTES), 5)]
                refused = [Refused(*row[:-1])  # a refused name has no processes
                           for row in _fold(rows(_REFUSED_ROWS, _REFUSED_MINUTES), 1)]
            timeline = [Minute(*row) for row in rows(_TIMELINE)]
    except sa.exc.SQLAlchemyError as err:
        raise StoreError(f"cannot read the report from the store: "
                         f"{' '.join(str(getattr(err, 'orig', err)).split())[:200]}") from None
    finally:
        engine.dispose()
    return Facts(
        sorted(blocked, key=lambda b: (-b.attempts, b.destination, b.port, b.protocol)),
        sorted(late, key=lambda la: (-la.count, la.destination, la.port, la.protocol)),
        sorted(refused, key=lambda r: (-r.attempts, r.name)),
        timeline)


def _split(processes: str | None) -> tuple[str, ...]:
    return tuple(sorted(p for p in (processes or "").split(",") if p))


def _fold(rows: Iterable, width: int) -> list[tuple]:
    """Rows grouped per process -> (*key, count, first, last, processes) per key."""
    groups: dict[tuple, list] = collections.OrderedDict()
    for row in rows:
        key, process, count, first, last = (tuple(row[:width]), row[width], row[width + 1],
                                            row[width + 2], row[width + 3])
        group = groups.setdefault(key, [0, first, last, set()])
        group[0] += int(count)
        group[1], group[2] = min(group[1], first), max(group[2], last)
        if process:
            group[3].add(process)
    return [(*key, n, first, last, tuple(sorted(procs)))
            for key, (n, first, last, procs) in groups.items()]
