"""enrich: give each kernel event the name of its destination.

Consumes: `raw_events` batches on ipc://<run_dir>/enrich.sock (from capture, or from
          `sluice replay`).
Produces: `enriched_events` batches (address text, protocol name, process, hostname when
          known), pushed to policy (ipc://<run_dir>/policy.sock).
Binds:    enrich.sock. Connects: policy.
Names:    what the IP -> name cache knows. Lookups that take time run beside the event flow
          (never in it), so a slow name never holds back events for other destinations.
Bad input: a malformed message or record is counted and skipped (logged once per kind).
Never blocks: a batch policy cannot take waits in a small backlog, then is dropped and
          counted (policy_dropped).

Example:  sluice run enrich
"""

from __future__ import annotations

import threading

import zmq

from ..events import EnrichedEvent, RawEvent
from ..loop import BaseStage, StageIO, batched, run_stage
from ..settings import Settings


class EnrichStage(BaseStage):
    name = "enrich"

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def setup(self, io: StageIO) -> None:
        self.io = io
        io.bind_inboxes()
        self.feed = io.connect_feed("policy", backlog=1024)
        io.ready = True
        io.log.info("listening on enrich.sock, feeding policy")

    def handle(self, inbox: str, kind: str, records: list) -> None:
        if kind == "raw_events":
            self.forward(records)

    def forward(self, events: list[RawEvent]) -> None:
        enriched = [EnrichedEvent.from_raw(e, self.names.get(e.dst_ip, "")) for e in events]
        for batch in batched(enriched, self.io.settings.batch_max):
            self.feed.send(batch)


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(EnrichStage(), settings, ctx=ctx, stop=stop)
