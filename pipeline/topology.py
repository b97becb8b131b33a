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
    name: str       # socket file stem, e.g. "policy" -> policy.sock
    pattern: str    # "pull" for event streams, "rep" for the one request/reply path
    kinds: tuple[str, ...]  # message kinds accepted here


@dataclasses.dataclass(frozen=True)
class StageWiring:
    inboxes: tuple[Inbox, ...]
    feeds: tuple[str, ...]  # inbox names this stage connects to
    requests: tuple[str, ...] = ()  # REP inboxes this stage sends requests to and awaits


STAGES: dict[str, StageWiring] = {
    "capture": StageWiring(inboxes=(), feeds=("enrich",)),
    "enrich": StageWiring(
        inboxes=(Inbox("enrich", "pull", ("raw_events", "dns_mappings")),),
        feeds=("policy",),
    ),
    "policy": StageWiring(
        inboxes=(Inbox("policy", "pull", ("enriched_events",)),
                 Inbox("policy-allow", "rep", ("allow_requests",))),
        feeds=("persist", "notify"),
    ),
    "persist": StageWiring(
        inboxes=(Inbox("persist", "pull", ("audit_records", "delivered_destinations")),),
        feeds=(),
    ),
    "notify": StageWiring(
        inboxes=(Inbox("notify", "pull", ("notices",)),),
        feeds=("persist",),
    ),
    "dns": StageWiring(inboxes=(), feeds=("enrich", "persist"), requests=("policy-allow",)),
    # Reads the stored rows, not a socket: it is never on the path of an event.
    "export": StageWiring(inboxes=(), feeds=()),
}


def inbox_address(run_dir: Path, inbox: str) -> str:
    return f"ipc://{run_dir}/{inbox}.sock"


def inbox_path(run_dir: Path, inbox: str) -> Path:
    return run_dir / f"{inbox}.sock"
