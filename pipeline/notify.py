"""One notification per blocked destination: the dedup, its clients and the retry schedule.

* NotificationTracker (the seed's name) claims a destination key before anything is sent,
  so a flood of blocks to one destination is one notification; a send that fails releases
  the key, so a later block to it tries again (reference §2.7).
* A StateMachineClient (the seed's name) takes one notification to its sink: WebhookClient
  (pipeline/webhook.py) POSTs JSON, LogClient writes a log line. Both raise DeliveryError
  when the sink did not take it; neither ever puts the bearer token in a message, a log
  line or a repr.
* retry_delay is the backoff between attempts: exponential, with jitter.
* Storm gathers the destinations that arrive while the webhook is busy with as many as it
  can take: they leave as one Summary per interval (counts per process and port, the first
  destinations, where to look in the store) instead of being dropped.

Pure apart from the clients' own I/O: no clock, no thread (the notify stage has those).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Protocol

import msgspec

from .audit.records import format_timestamp
from .fingerprints import FingerprintSet

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0


class DeliveryError(Exception):
    """The sink did not take a notification; the text never holds a secret."""


def destination_key(hostname: str, ip: str, port: int) -> str:
    """`<hostname or ip>:<port>` (reference §2.7): one notification per key."""
    return f"{hostname or ip}:{port}"


class Notification(msgspec.Struct, frozen=True):
    """One new blocked destination to deliver. A frozen Struct, made in C: one is made for
    every new destination, in a scan for every notice, and a frozen dataclass took twelve
    times as long to make."""

    key: str
    hostname: str
    ip: str
    port: int            # the protocol number for protocol blocks
    protocol: str
    process: str
    first_seen_ns: int   # the block that created the notification
    mode: str            # audit or enforce
    event_type: str      # connection_blocked or protocol_blocked

    def body(self, host: str) -> dict:
        """The webhook's JSON document."""
        return {"hostname": self.hostname, "ip": self.ip, "port": self.port,
                "protocol": self.protocol, "process": self.process,
                "first_seen": format_timestamp(self.first_seen_ns), "mode": self.mode,
                "event_type": self.event_type, "host": host}


SUMMARY_EVENT = "blocked_destinations_summary"
SUMMARY_FIRST = 20       # destinations named in a summary; the rest are counted
SUMMARY_GROUPS = 20      # processes and ports named in a summary; the rest are "other"
STORM_KEYS = 1_000_000   # destinations a storm holds to remember once summarized


@dataclasses.dataclass
class Summary:
    """One notice standing for many blocked destinations; sent like a Notification."""

    key: str
    count: int                     # destinations it stands for
    first_seen_ns: int
    last_seen_ns: int
    by_process: dict[str, int]
    by_port: dict[str, int]        # "443/TCP" -> destinations
    destinations: list[str]        # the first keys
    mode: str
    members: list[Notification]    # what to remember once it is delivered (at most STORM_KEYS)

    def body(self, host: str) -> dict:
        query = ("SELECT * FROM blocked_destinations WHERE host = '" + host.replace("'", "''")
                 + f"' AND last_seen >= '{format_timestamp(self.first_seen_ns)}' "
                 "ORDER BY first_seen")
        return {"event_type": SUMMARY_EVENT, "host": host, "mode": self.mode,
                "destinations_count": self.count,
                "first_seen": format_timestamp(self.first_seen_ns),
                "last_seen": format_timestamp(self.last_seen_ns),
                "by_process": self.by_process, "by_port": self.by_port,
                "destinations": self.destinations,
                "more": self.count - len(self.destinations),
                "see": f'sluice query "{query}"'}


class Storm:
    """Blocked destinations the webhook had no room for, until a Summary takes them."""

    def __init__(self, max_keys: int = STORM_KEYS) -> None:
        self.max_keys = max_keys
        self.taken = 0  # summaries made, for their keys
        self._clear()

    def _clear(self) -> None:
        self.count = 0
        self.first_ns = self.last_ns = 0
        self.processes: collections.Counter[str] = collections.Counter()
        self.ports: collections.Counter[str] = collections.Counter()
        self.first: list[str] = []
        self.members: list[Notification] = []
        self.mode = ""

    def __len__(self) -> int:
        return self.count

    def add(self, n: Notification) -> None:
        self.count += 1
        self.first_ns = min(self.first_ns or n.first_seen_ns, n.first_seen_ns)
        self.last_ns = max(self.last_ns, n.first_seen_ns)
        self._count(self.processes, n.process or "?", 1)
        self._count(self.ports, f"{n.port}/{n.protocol}", 1)
        if len(self.first) < SUMMARY_FIRST:
            self.first.append(n.key)
        if len(self.members) < self.max_keys:
            self.members.append(n)
        self.mode = n.mode or self.mode

    @staticmethod
    def _count(counter: collections.Counter, name: str, n: int) -> None:
        # A flood of distinct process names must not grow this without end.
        counter["other" if name not in counter and len(counter) >= 1000 else name] += n

    def take(self) -> Summary | None:
        """Everything gathered so far as one Summary; None when there is nothing."""
        if not self.count:
            return None
        self.taken += 1
        summary = Summary(f"summary-{self.taken}", self.count, self.first_ns, self.last_ns,
                          _top(self.processes), _top(self.ports), self.first, self.mode,
                          self.members)
        self._clear()
        return summary

    def give_back(self, summary: Summary) -> None:
        """A summary that could not be delivered: what it stood for goes into the next."""
        self.count += summary.count
        self.first_ns = min(self.first_ns or summary.first_seen_ns, summary.first_seen_ns)
        self.last_ns = max(self.last_ns, summary.last_seen_ns)
        for name, n in summary.by_process.items():
            self._count(self.processes, name, n)
        for name, n in summary.by_port.items():
            self._count(self.ports, name, n)
        self.first = (summary.destinations + self.first)[:SUMMARY_FIRST]
        self.members = (summary.members + self.members)[:self.max_keys]
        self.mode = self.mode or summary.mode


def _top(counter: collections.Counter) -> dict[str, int]:
    top = dict(counter.most_common(SUMMARY_GROUPS))
    rest = sum(counter.values()) - sum(top.values())
    if rest:
        top["other"] = top.get("other", 0) + rest
    return top


class StateMachineClient(Protocol):
    def send(self, notification: Notification) -> None:
        """Deliver one notification; raise DeliveryError when the sink did not take it."""


class NotifySink(Protocol):
    """Where the notify stage's courier delivers: notifications, and storm summaries sent
    like them (WebhookClient)."""

    def send(self, notification: Notification | Summary) -> None:
        """Deliver one; raise DeliveryError when the sink did not take it."""


class NotificationTracker:
    """The destinations already notified (or being notified), and the client that sends."""

    def __init__(self, client: StateMachineClient,
                 notified: Iterable[str] | FingerprintSet = ()) -> None:
        self.client = client
        # Every destination ever alerted on, 8 bytes each: a scan brings hundreds of thousands.
        self.claimed = (notified if isinstance(notified, FingerprintSet)
                        else FingerprintSet(notified))

    def send_notification(self, hostname: str, ip: str, port: int, *, protocol: str = "",
                          process: str = "", first_seen_ns: int = 0, mode: str = "",
                          event_type: str = "") -> bool:
        """Send a notification unless its destination has one already; True when sent.
        DeliveryError from the client is passed on, after the key is released."""
        key = destination_key(hostname, ip, port)
        if not self.claimed.add(key):  # before sending: duplicates meanwhile stay quiet
            return False
        try:
            self.client.send(Notification(key, hostname, ip, port, protocol, process,
                                          first_seen_ns, mode, event_type))
        except DeliveryError:
            self.release(key)
            raise
        return True

    def claim(self, key: str) -> bool:
        """Claim a key without sending (a storm summarizes it); False if claimed already."""
        return self.claimed.add(key)

    def release(self, key: str) -> None:
        """Forget a key whose notification was not delivered: its next block retries."""
        self.claimed.discard(key)


def retry_delay(attempt: int, rand: Callable[[], float] = random.random,
                first: float = RETRY_FIRST_S, cap: float = RETRY_MAX_S) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...): doubling from
    `first` up to `cap`, the upper half jittered, so a dead sink is never hammered and
    many retries do not fall due together."""
    ceiling = min(cap, first * 2 ** (attempt - 1))
    return ceiling / 2 + rand() * ceiling / 2


def sink_origin(url: str) -> str:
    """scheme://host[:port] of a webhook URL: what may be logged. Paths and queries often
    carry a secret (many chat webhooks are one), and so can user info."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class LogClient:
    """Without a webhook: one log line per new destination, at most `per_second` lines a
    second; a flood to many destinations is summarized rather than drowning the log (every
    destination is still in the audit store)."""

    def __init__(self, log: logging.Logger, per_second: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.per_second, self.clock = log, per_second, clock
        self.window = 0.0
        self.logged = self.suppressed = 0

    def send(self, notification: Notification) -> None:
        now = self.clock()
        if now - self.window >= 1.0:
            if self.suppressed:
                self.log.warning("%d more new blocked destinations were not logged one by one "
                                 "(see the audit store)", self.suppressed)
            self.window, self.logged, self.suppressed = now, 0, 0
        if self.logged >= self.per_second:
            self.suppressed += 1
            return
        self.logged += 1
        n = notification
        self.log.warning("blocked destination %s (%s %s, process %s, %s mode, first seen %s)",
                         n.key, n.ip, n.protocol, n.process or "?", n.mode,
                         format_timestamp(n.first_seen_ns))
