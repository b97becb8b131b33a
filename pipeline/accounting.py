"""In = out, end to end, from the stages' counters: what `sluice status` prints below them.

Pure: it reads the counter snapshots (<run_dir>/<stage>.counters.json) it is given. Counters
start afresh with each stage, so the figures are this run's; the journal's unstored count
also covers what earlier runs left, which this run sends again (resent).
"""

from __future__ import annotations

from collections.abc import Mapping

Counters = Mapping[str, int]


def lines(counters: Mapping[str, Counters]) -> list[str]:
    capture, persist = counters.get("capture", {}), counters.get("persist", {})
    c, p = capture.get, persist.get
    read, journaled = c("records_read", 0), c("records_journaled", 0)
    unjournaled = c("journal_full", 0) + c("journal_errors", 0)
    lost = {"records_lost": c("records_lost", 0), "short_records": c("short_records", 0),
            "ring_records_skipped": c("ring_records_skipped", 0)}
    return [
        f"kernel:  denied {c('kernel_denied', 0)} packet(s); the ring buffer refused "
        f"{c('kernel_ringbuf_full', 0)} record(s): {c('kernel_parked', 0)} packet(s) parked "
        f"and swept ({c('overflow_swept', 0)} record(s)), {c('kernel_lost', 0)} lost"
        + (f"; {c('kernel_evicted')} packet(s) evicted with their flow before being "
           "reported" if c("kernel_evicted") else "")
        + (f"; {c('map_read_errors')} failed map read(s)" if c("map_read_errors") else ""),
        f"capture: read {read} = journaled {journaled} + unjournaled {unjournaled}"
        f"{'' if read == journaled + unjournaled else ' (MISMATCH)'}; sent to enrich "
        f"{c('enrich_sent', 0)}, of them {c('records_resent', 0)} resent from an earlier run",
        f"journal: {c('journal_unstored', 0)} record(s) not stored yet "
        f"({c('journal_bytes', 0)} bytes on disk)",
        f"persist: stored {p('rows_inserted', 0)} row(s), {p('duplicates_skipped', 0)} already "
        f"stored, {p('records_rejected', 0)} rejected, {p('records_held', 0)} held",
        "lost:    " + (", ".join(f"{k} {v}" for k, v in lost.items() if v) or "nothing"),
    ]
