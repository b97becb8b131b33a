"""Who binds which inbox and feeds whom: the one written-down copy of the wiring.

Each stage binds its own inboxes on ipc://<run_dir>/<inbox>.sock and connects to the inboxes
of the stages it feeds, so start order does not matter. The README's diagram and the
Procfile agree with this table (tests check both).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Inbox:
    name: str       # socket file stem, e.g. "policy" -> policy.sock (inbox_file)
    pattern: str    # "pull" for event streams, "rep" for the one request/reply path
    kinds: tuple[str, ...]  # message kinds accepted here


@dataclasses.dataclass(frozen=True)
class Link:
    """What one stage sends to another stage's inbox: a PUSH feed, or the requests of a
    DEALER to a REP inbox. A stage finds its links by the message kinds it sends."""
    inbox: str
    kinds: tuple[str, ...]  # what this stage sends there (a subset of the inbox's kinds)
    audit_path: bool = False  # never dropped: the sender takes no new work while it waits
    backlog: int = 64  # batches kept while the peer is full (off the audit path), then dropped


@dataclasses.dataclass(frozen=True)
class StageWiring:
    inboxes: tuple[Inbox, ...]
    feeds: tuple[Link, ...] = ()     # inboxes this stage pushes to
    requests: tuple[Link, ...] = ()  # REP inboxes this stage sends requests to and awaits
    # The stage's CPU priority step, a nice increment (pipeline/loop.py): the DNS proxy steps
    # forward (ANSWER_PATH). Every other stage stays as started: policy's answers are lent
    # real-time by dns (pipeline/lending.py), and the rest of its work is a flood's, as
    # capture's, enrich's, persist's, notify's and export's is. Ahead, that work would keep
    # the host's own programs waiting for a CPU (persist at -5 held it for up to 12 ms at a
    # time while a DNS client whose answer had arrived waited); behind, the evidence would
    # wait behind every busy job on the host. Its backlog waits in capture's journal.
    cpu_step: int = 0
    # The share of one CPU the stage's own thread may take real-time, ahead of every ordinary
    # thread (pipeline/cpushare.py): only for a stage whose work is nothing but answering
    # clients. policy's thread also judges the flood's events, so it takes none: dns lends
    # it real-time for each allow request instead (pipeline/lending.py; every REP inbox's
    # answering thread can be lent it by the stages that send it requests).
    realtime_share: float = 0.0

    @property
    def feed_names(self) -> tuple[str, ...]:
        return tuple(link.inbox for link in self.feeds)

    @property
    def request_reply(self) -> bool:
        """The stage asks another's REP inbox or has one of its own (the answer path)."""
        return bool(self.requests) or any(inbox.pattern == "rep" for inbox in self.inboxes)


# dns: about three times an ordinary program's share of a CPU while both want it.
ANSWER_PATH = -5

STAGES: dict[str, StageWiring] = {
    "capture": StageWiring(inboxes=(), feeds=(Link("enrich", ("raw_events",), audit_path=True),)),
    "enrich": StageWiring(
        inboxes=(Inbox("enrich", "pull", ("raw_events", "dns_mappings")),),
        feeds=(Link("policy", ("enriched_events",), audit_path=True),),
    ),
    "policy": StageWiring(
        inboxes=(Inbox("policy", "pull", ("enriched_events",)),
                 Inbox("policy-allow", "rep", ("allow_requests",))),
        # Observers never hold up the audit path: notify's batches beyond the backlog drop.
        feeds=(Link("persist", ("audit_records",), audit_path=True),
               Link("notify", ("notices",))),
    ),
    "persist": StageWiring(
        inboxes=(Inbox("persist", "pull", ("audit_records", "delivered_destinations")),),
    ),
    "notify": StageWiring(
        inboxes=(Inbox("notify", "pull", ("notices",)),),
        feeds=(Link("persist", ("delivered_destinations",), backlog=1024),),
    ),
    "dns": StageWiring(
        inboxes=(),
        feeds=(Link("enrich", ("dns_mappings",), backlog=1024),
               Link("persist", ("audit_records",), backlog=1024)),
        requests=(Link("policy-allow", ("allow_requests",)),),
        cpu_step=ANSWER_PATH,
        realtime_share=0.25,  # a query flood takes at most a quarter of one CPU ahead
    ),
    # Reads the stored rows, not a socket: it is never on the path of an event.
    "export": StageWiring(inboxes=()),
}


def inbox_owner(inbox: str) -> str:
    """The stage that binds inbox."""
    [stage] = [name for name, wiring in STAGES.items() if inbox in (i.name for i in wiring.inboxes)]
    return stage


def upstreams(stage: str) -> tuple[str, ...]:
    """The stages that feed one of stage's event inboxes: at a stop it takes their last
    records before it ends (pipeline/stopping.py)."""
    inboxes = {i.name for i in STAGES[stage].inboxes if i.pattern == "pull"}
    return tuple(name for name, wiring in STAGES.items() if set(wiring.feed_names) & inboxes)


def inbox_taking(kind: str) -> str:
    """The one inbox that accepts kind (where `sluice replay` sends a recording)."""
    [inbox] = [i.name for wiring in STAGES.values() for i in wiring.inboxes if kind in i.kinds]
    return inbox


def inbox_file(inbox: str) -> str:
    """The socket file name of an inbox: the one place it is spelled."""
    return f"{inbox}.sock"


def inbox_path(run_dir: Path, inbox: str) -> Path:
    return run_dir / inbox_file(inbox)


def inbox_address(run_dir: Path, inbox: str) -> str:
    return f"ipc://{inbox_path(run_dir, inbox)}"


def wiring_text(stage: str) -> str:
    """A stage's wiring for its start-up line, e.g. "inbox enrich.sock, feeds policy"."""
    wiring = STAGES[stage]
    inboxes = ", ".join(inbox_file(inbox.name) for inbox in wiring.inboxes)
    links = [*wiring.feed_names, *(f"{link.inbox} (requests)" for link in wiring.requests)]
    parts = [f"inbox {inboxes}" if inboxes else "", f"feeds {', '.join(links)}" if links else ""]
    return ", ".join(part for part in parts if part) or "no sockets"
