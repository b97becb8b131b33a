"""policy: program the firewall maps from the policy, and decide each event's outcome.

Consumes: `enriched_events` batches on ipc://<run_dir>/policy.sock.
Produces: `audit_records` batches (one per event, normalized here, once) to persist.
Binds:    policy.sock. Connects: persist.
Kernel:   the single writer of the firewall maps. Once capture has pinned them under
          SLUICE_BPF_DIR, writes the default action, the mode and the static rules, then
          bumps map_config.generation: the signal capture waits for before it attaches. A
          restarted policy re-adopts the pinned maps and moves them to the policy by a diff,
          with no moment of an empty allowlist.
Start:    a policy that does not load stops the stage with one line naming the file, the
          place and the problem.
Bad input: a malformed message or record is counted and skipped (logged once per kind).

Example:  SLUICE_POLICY=/etc/sluice/policy.json sluice run policy
"""

from __future__ import annotations

import secrets
import threading
from typing import Callable

import zmq

from ..kernel.maps import KernelRuleMaps, pins_present
from ..loop import BaseStage, StageIO, batched, run_stage
from ..outcome import decide
from ..policy.load import load_policy
from ..firewall import Firewall
from ..rulemaps import RuleMaps
from ..settings import Settings


class EventIds:
    """Unique audit event ids: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"{self.prefix}-{self.count:x}"


class PolicyStage(BaseStage):
    name = "policy"

    def __init__(self, open_maps: Callable[[Settings], RuleMaps | None] | None = None) -> None:
        self.open_maps = open_maps or _open_kernel_maps
        self.firewall: Firewall | None = None
        self.ids = EventIds()

    def setup(self, io: StageIO) -> None:
        self.io = io
        self.settings = io.settings
        self.policy = load_policy(self.settings)
        self.host = self.settings.host_name
        io.bind_inboxes()
        self.persist = io.connect_feed("persist", backlog=1024)
        io.log.info("loaded %r (%s mode); waiting for capture's maps in %s", self.policy,
                    self.settings.mode, self.settings.bpf_dir)

    def tick(self, now: float) -> None:
        if self.firewall is None:
            maps = self.open_maps(self.settings)
            if maps is not None:
                self._program(maps)

    def _program(self, maps: RuleMaps) -> None:
        firewall = Firewall(maps)
        firewall.program(self.policy, self.settings.audit_mode)
        firewall.mark_programmed()
        self.firewall = firewall
        self.io.ready = True
        self.io.log.info("maps programmed: default %s, %d rule(s), %s mode",
                         self.policy.default_action, len(self.policy.rules), self.settings.mode)

    def handle(self, inbox: str, kind: str, records: list) -> None:
        audit_mode = self.settings.audit_mode
        outcomes = [decide(event, audit_mode=audit_mode, event_id=self.ids.next(), host=self.host)
                    for event in records]
        for batch in batched((o.record for o in outcomes), self.settings.batch_max):
            self.persist.send(batch)

    def teardown(self) -> None:
        if self.firewall is not None:
            close = getattr(self.firewall.maps, "close", None)
            if close:
                close()


def _open_kernel_maps(settings: Settings) -> RuleMaps | None:
    if not pins_present(settings.bpf_dir):
        return None
    return KernelRuleMaps(settings.bpf_dir)


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(PolicyStage(), settings, ctx=ctx, stop=stop)

