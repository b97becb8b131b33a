"""Latency histograms a stage keeps and writes beside its counters (no clock of their own).

A Histogram counts observations (seconds) into fixed buckets, as Prometheus histograms do:
bucket i counts values <= bounds[i], the last one (+Inf) counts the rest. The stage loop
writes snapshot() of each into <run_dir>/<stage>.counters.json under "histograms", where the
export stage's /metrics reads them (pipeline/export/metrics.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

# From 100 µs to 5 s: a cached DNS answer takes well under a millisecond, a policy round trip
# about one, an upstream lookup tens, a timeout seconds.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("bucket bounds must increase")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict[str, Any]:
        """Plain JSON: bounds, per-bucket counts (one more than bounds), sum and count."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum,
                "count": self.count}


def cumulative(snapshot: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Prometheus buckets (le, observations <= le) of a snapshot, +Inf last."""
    buckets: list[tuple[str, int]] = []
    running = 0
    for bound, count in zip([*snapshot["bounds"], "+Inf"], snapshot["counts"], strict=True):
        running += count
        buckets.append((bound if bound == "+Inf" else repr(float(bound)), running))
    return buckets
