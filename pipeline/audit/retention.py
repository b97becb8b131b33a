"""SLUICE_RETENTION_DAYS: persist deletes audit rows older than that, a small batch at a time.

A pass starts at the first idle moment after start-up and then once an hour. Each step
deletes one batch (AuditStore.prune_batch: one short transaction), and persist takes a step
only when it has nothing waiting to be committed, so audit writes never wait behind more than
one batch. The pass ends with a line saying what it pruned. The daily and all-time rollups
keep counting the pruned rows (README "Retention").
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import StoreError
from .store import AuditStore
from .timestamps import sql_timestamp

PASS_INTERVAL_S = 3600.0
_DAY_NS = 86_400 * 1_000_000_000


class Retention:
    """When to prune and up to when; the store does the deleting."""

    def __init__(self, days: int, clock: Callable[[], int]) -> None:
        self.days, self.clock = days, clock
        self.next_pass = 0.0  # monotonic seconds; 0: at the first idle tick
        self.cutoff: str | None = None  # the pass under way
        self.rows = 0

    def step(self, store: AuditStore, now: float) -> tuple[int, str | None]:
        """Prune one batch if a pass is due: (rows deleted, a summary when the pass ended).

        A StoreError ends the pass; the next one starts an hour later.
        """
        if self.cutoff is None:
            if now < self.next_pass:
                return 0, None
            self.cutoff = sql_timestamp(self.clock() - self.days * _DAY_NS)
            self.rows = 0
        try:
            batch = store.prune_batch(self.cutoff)
        except StoreError:
            self.cutoff, self.next_pass = None, now + PASS_INTERVAL_S
            raise
        self.rows += batch.rows
        if not batch.done:
            return batch.rows, None
        summary = (f"retention: pruned {self.rows} audit row(s) and {batch.minutes} timeline "
                   f"minute(s) older than {self.cutoff} (SLUICE_RETENTION_DAYS={self.days})")
        self.cutoff, self.next_pass = None, now + PASS_INTERVAL_S
        return batch.rows, summary
