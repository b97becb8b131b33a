"""Prometheus metrics: what `sluice status` shows, read at each scrape (prometheus-client).

The export stage serves this on SLUICE_METRICS_LISTEN. Every scrape reads the same files
`sluice status` reads, so the two agree:

* sluice_<stage>_<counter>_total: each counter in <run_dir>/<stage>.counters.json; the ones
  a stage declares levels (records held, a backlog) are gauges, sluice_<stage>_<counter>;
* sluice_stage_up{stage}: 1 while the stage runs (its ready marker's pid is alive);
* sluice_kernel_<counter>_total{cpu}: the classifier's per-CPU counters, read from the
  pinned map_counters (packets, allowed, denied, events, aggregated, ringbuf_full, malformed);
* sluice_ringbuf_lost_total: records the kernel could not put in the ring buffer (all CPUs;
  their packets are reported by later records);
* sluice_<stage>_<name> histograms a stage keeps (the dns stage's answer_latency_seconds,
  query_wait_seconds, upstream_round_trip_seconds and allow_round_trip_seconds);
* the export backlog is the export stage's otlp_backlog and syslog_backlog gauges.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from ..histogram import cumulative
from ..posture import stage_states

_NAME = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(*parts: str) -> str:
    return _NAME.sub("_", "_".join(("sluice", *parts)))


def read_stage_file(run_dir: Path, stage: str) -> dict:
    try:
        value = json.loads((run_dir / f"{stage}.counters.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def stage_metrics(stage: str, state: Mapping) -> Iterable[Metric]:
    """The metrics of one stage's counters file (pure: tests feed it dicts)."""
    levels = set(state.get("levels") or ())
    for name, value in sorted((state.get("counters") or {}).items()):
        if not isinstance(value, (int, float)):
            continue
        if name in levels:
            gauge = GaugeMetricFamily(metric_name(stage, name), f"{stage}: {name} (a level)")
            gauge.add_metric([], value)
            yield gauge
        else:
            counter = CounterMetricFamily(metric_name(stage, name), f"{stage}: {name}")
            counter.add_metric([], value)
            yield counter
    for name, snapshot in sorted((state.get("histograms") or {}).items()):
        try:
            buckets = cumulative(snapshot)
            total = float(snapshot["sum"])
        except (KeyError, TypeError, ValueError):
            continue
        histogram = HistogramMetricFamily(metric_name(stage, name), f"{stage}: {name}")
        histogram.add_metric([], buckets, total)
        yield histogram


def kernel_metrics(per_cpu: Mapping[str, list[int]]) -> Iterable[Metric]:
    """Per-CPU kernel counters (name -> one value per possible CPU)."""
    for name, values in per_cpu.items():
        counter = CounterMetricFamily(metric_name("kernel", name),
                                      f"classifier: {name}, per CPU", labels=["cpu"])
        for cpu, value in enumerate(values):
            counter.add_metric([str(cpu)], value)
        yield counter
    if "ringbuf_full" in per_cpu:
        lost = CounterMetricFamily(metric_name("ringbuf_lost"),
                                   "records the kernel could not reserve in the ring buffer")
        lost.add_metric([], sum(per_cpu["ringbuf_full"]))
        yield lost


def read_kernel_counters(bpf_dir: Path) -> dict[str, list[int]]:
    """The pinned map_counters, per CPU; {} when there is none (capture not running) or it
    cannot be read."""
    pin = bpf_dir / "map_counters"
    if not pin.exists():
        return {}
    try:
        from ..kernel import libbpf
        from ..kernel.structs import COUNTER_SLOTS, KERNEL_COUNTERS

        fd = libbpf.obj_get(str(pin))
    except (OSError, ImportError, AttributeError):
        return {}
    try:
        cpus = libbpf.possible_cpus()
        out = {}
        for index, name in enumerate(KERNEL_COUNTERS[:COUNTER_SLOTS]):
            values = (ctypes.c_uint64 * cpus)()
            if libbpf.lookup(fd, ctypes.c_uint32(index), values):
                out[name] = list(values)
        return out
    finally:
        os.close(fd)


class SluiceCollector(Collector):
    """Reads the run dir (and the pinned kernel counters) at every scrape."""

    def __init__(self, run_dir: Path, bpf_dir: Path, stages: Iterable[str]) -> None:
        self.run_dir, self.bpf_dir, self.stages = run_dir, bpf_dir, tuple(stages)

    def collect(self) -> Iterable[Metric]:
        states, _ = stage_states(self.run_dir, self.stages)
        up = GaugeMetricFamily(metric_name("stage_up"), "1 while the stage runs",
                               labels=["stage"])
        for name, state in states.items():
            up.add_metric([name], 1 if state.state == "ready" else 0)
        yield up
        for stage in self.stages:
            yield from stage_metrics(stage, read_stage_file(self.run_dir, stage))
        yield from kernel_metrics(read_kernel_counters(self.bpf_dir))
