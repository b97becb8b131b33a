"""The posture: every protection layer and its state, as the running stages report it.

A stage reports a layer with StageIO.report_layer(name, state, detail, requested=..., **facts);
the loop keeps the stage's reports in <run_dir>/<stage>.layers.json:

    {"stage": "dns", "pid": 4242, "time": 1767225600.0,
     "layers": {"dns_proxy": {"state": "on", "requested": true,
                              "detail": "127.0.0.1:53 (udp, tcp)", "listen": ["127.0.0.1:53"]}}}

`state` is one of STATES, `requested` says whether the settings asked for the layer, `detail`
is one line for people, and any further keys are facts for `sluice status --json`. The file is
written atomically on every change and removed when the stage stops, so a report is trusted
only while its pid is alive: a stage that died vouches for nothing.

This module combines the reports with the stages' failure markers, counters and the
attachment record into one Posture (combine, pure) and says what keeps it from being ready
(problems): a requested layer that is not "on" is never taken for a smaller protection.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from . import accounting

STATES = ("on", "off", "pending", "partial", "failed", "stale", "down")
SETTLED_BAD = ("partial", "failed")  # reported by a live stage: waiting will not help


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    name: str
    stage: str     # the stage that reports it (and whose failure takes it down)
    gates: bool    # a requested layer that is not "on" keeps the pipeline from being ready
    help: str


LAYERS: tuple[LayerSpec, ...] = (
    LayerSpec("classifier", "capture", True,
              "the TC classifier: interface, direction, mode, default action, policy generation"),
    LayerSpec("cgroup_hooks", "capture", True,
              "connect/sendmsg hooks naming the process of each socket"),
    LayerSpec("ipv6", "capture", True, "IPv6 traffic filtered like IPv4"),
    LayerSpec("policy", "policy", True, "the rules programmed into the maps, and their source"),
    LayerSpec("dns_proxy", "dns", True, "the DNS proxy that opens allowed names just in time"),
    # Programmed by capture with the cgroup hooks (SLUICE_DNS_REDIRECT).
    LayerSpec("dns_redirect", "capture", True,
              "DNS sent to any resolver is answered by the proxy"),
    LayerSpec("ring_buffer", "capture", False,
              "events lost so far: in the kernel ring buffer and between stages"),
)
BY_NAME = {spec.name: spec for spec in LAYERS}


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    state: str
    requested: bool
    detail: str
    stage: str
    facts: Mapping = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict:
        return {"state": self.state, "requested": self.requested, "detail": self.detail,
                "stage": self.stage, **self.facts}


@dataclasses.dataclass(frozen=True)
class StageState:
    name: str
    state: str          # ready, starting, failed, down
    pid: int | None
    detail: str
    counters: Mapping
    threads: Mapping = dataclasses.field(default_factory=dict)  # helper thread -> state


@dataclasses.dataclass(frozen=True)
class Posture:
    layers: dict[str, Layer]
    stages: dict[str, StageState]

    def problems(self, stages: set[str] | None = None) -> list[str]:
        """Why the pipeline is not fully on: one line per requested layer that is not."""
        lines = []
        for layer in self.layers.values():
            spec = BY_NAME[layer.name]
            if not spec.gates or not layer.requested or layer.state == "on":
                continue
            if stages is not None and spec.stage not in stages:
                continue
            lines.append(f"layer {layer.name} is {layer.state}: {layer.detail}")
        return lines

    def settled_failures(self, stages: set[str] | None = None) -> list[str]:
        """Problems that waiting cannot cure: a failed stage, a layer reported failed."""
        lines = []
        for layer in self.layers.values():
            spec = BY_NAME[layer.name]
            if (spec.gates and layer.requested and layer.state in SETTLED_BAD
                    and (stages is None or spec.stage in stages)):
                lines.append(f"layer {layer.name} is {layer.state}: {layer.detail}")
        return lines

    def as_json(self) -> dict:
        return {"ready": not self.problems() and all(
                    s.state == "ready" for s in self.stages.values()),
                "problems": self.problems(),
                "layers": {name: layer.as_json() for name, layer in self.layers.items()},
                "stages": {name: {"state": s.state, "pid": s.pid, "detail": s.detail,
                                  "counters": dict(s.counters), "threads": dict(s.threads)}
                           for name, s in self.stages.items()},
                "accounting": accounting.lines({name: s.counters
                                                for name, s in self.stages.items()})}


# ------------------------------------------------------------------ what stages report


def classifier_report(interface: str, requested_mode: str, attached: bool,
                      config: tuple[str, str, int] | None) -> dict:
    """capture's classifier layer; config is the kernel's (default action, mode, generation),
    meaningful once policy has programmed the maps (generation != 0)."""
    facts: dict[str, object] = {"interface": interface, "direction": "egress",
                                "requested_mode": requested_mode}
    if config is None or not config[2]:
        return {"state": "pending", "detail": f"waiting for the policy stage to program "
                f"the maps before attaching to {interface}", **facts}
    default_action, mode, generation = config
    facts.update(mode=mode, default_action=default_action, policy_generation=generation)
    if mode != requested_mode:
        return {"state": "failed", "detail": f"the kernel's maps say {mode} mode, "
                f"{requested_mode} was requested", **facts}
    if not attached:
        return {"state": "pending", "detail": f"the maps are programmed, attaching to "
                f"{interface}", **facts}
    return {"state": "on", "detail": f"{interface} egress, {mode} mode, default "
            f"{default_action}, policy generation {generation}", **facts}


def hooks_report(cgroup: str, attached: int, expected: int) -> dict:
    facts = {"cgroup": cgroup, "attached": attached, "expected": expected}
    if attached == expected:
        return {"state": "on", "detail": f"{attached} hooks on {cgroup}", **facts}
    state = "partial" if attached else "failed"
    return {"state": state, "detail": f"{attached} of {expected} hooks attached on {cgroup} "
            "(the stage log says why)", **facts}


def ipv6_report(interface: str, disabled: bool | None, v6_hooks: int) -> dict:
    """The classifier parses IPv6 itself; the v6 socket hooks name its processes."""
    if disabled is None:
        return {"state": "on", "detail": "IPv6 is not available on this host",
                "enabled": False}
    if disabled:
        return {"state": "on", "detail": f"IPv6 is disabled on {interface}", "enabled": False}
    if v6_hooks < 2:
        return {"state": "partial", "detail": f"IPv6 on {interface} is filtered, but "
                f"{2 - v6_hooks} of its 2 socket hooks are missing", "enabled": True}
    return {"state": "on", "detail": f"IPv6 on {interface} is filtered like IPv4",
            "enabled": True}


# ------------------------------------------------------------------ combining


def combine(reports: Mapping[str, tuple[str, dict]], stages: Mapping[str, StageState],
            requested: Mapping[str, bool], counters: Mapping[str, Mapping],
            attachment: Mapping | None) -> Posture:
    """reports: layer -> (stage, report) from live stages only; requested: what the settings
    ask for each layer (used when no live stage reports it)."""
    layers = {}
    for spec in LAYERS:
        if spec.name == "ring_buffer":
            layers[spec.name] = _ring_buffer(reports.get(spec.name), counters,
                                             stages.get("capture"))
        elif spec.name in reports:
            stage, report = reports[spec.name]
            facts = {k: v for k, v in report.items()
                     if k not in ("state", "requested", "detail")}
            state = str(report["state"]) if report.get("state") in STATES else "failed"
            layers[spec.name] = Layer(spec.name, state, bool(report.get("requested", True)),
                                      str(report.get("detail", "")), stage, facts)
        else:
            layers[spec.name] = _unreported(spec, stages.get(spec.stage), requested, attachment)
    return Posture(layers, dict(stages))


def _unreported(spec: LayerSpec, stage: StageState | None, requested: Mapping[str, bool],
                attachment: Mapping | None) -> Layer:
    wanted = requested.get(spec.name, True)
    if spec.name == "classifier" and attachment and attachment.get("filter_attached") \
            and (stage is None or stage.state != "ready"):
        return Layer(spec.name, "stale", wanted,
                     f"the filter is still attached to {attachment.get('interface')} but no "
                     "capture stage is running: nothing new is opened or recorded "
                     "(`sluice detach` removes it)", spec.stage,
                     {"interface": attachment.get("interface"), "direction": "egress"})
    if not wanted:
        return Layer(spec.name, "off", False, "not requested", spec.stage)
    if stage is not None and stage.state == "failed":
        return Layer(spec.name, "failed", True, f"stage {spec.stage} failed: {stage.detail}",
                     spec.stage)
    if stage is not None and stage.state in ("ready", "starting"):
        return Layer(spec.name, "pending", True,
                     f"stage {spec.stage} is running but has not reported it yet", spec.stage)
    return Layer(spec.name, "down", True, f"stage {spec.stage} is not running", spec.stage)


def ring_buffer_report(reserve_failures: int, kernel_lost: int = 0, records_lost: int = 0,
                       kernel_evicted: int = 0) -> dict:
    """capture's view: records the ring buffer refused (parked by the kernel and swept into
    the journal, not lost), packets the kernel could not even park, packets evicted with
    their flow before being reported, and records capture had to drop (journal full and
    memory too); the reader adds the drops between stages."""
    return {"state": "on", "detail": "", "kernel_reserve_failures": reserve_failures,
            "kernel_lost_packets": kernel_lost, "kernel_evicted_packets": kernel_evicted,
            "records_lost": records_lost}


def _ring_buffer(report: tuple[str, dict] | None, counters: Mapping[str, Mapping],
                 capture: StageState | None) -> Layer:
    dropped = {f"{stage}.{name}": value for stage, values in sorted(counters.items())
               for name, value in sorted(values.items()) if name.endswith("_dropped") and value}
    if report is None:
        running = capture is not None and capture.state in ("ready", "starting")
        return Layer("ring_buffer", "pending" if running else "down", True,
                     "capture has not reported yet" if running else "capture is not running",
                     "capture", {"dropped_between_stages": dropped})
    refused = int(report[1].get("kernel_reserve_failures", 0))
    lost = int(report[1].get("kernel_lost_packets", 0))
    evicted = int(report[1].get("kernel_evicted_packets", 0))
    records_lost = int(report[1].get("records_lost", 0))
    facts = {"kernel_reserve_failures": refused, "kernel_lost_packets": lost,
             "kernel_evicted_packets": evicted, "records_lost": records_lost,
             "dropped_between_stages": dropped}
    total = sum(dropped.values())
    if not lost and not evicted and not records_lost and not total:
        detail = "nothing lost so far" + (
            f" ({refused} record(s) the full ring buffer refused were parked and swept)"
            if refused else "")
        return Layer("ring_buffer", "on", True, detail, "capture", facts)
    return Layer("ring_buffer", "partial", True,
                 f"{lost} packet(s) the kernel could not park, {evicted} evicted with their "
                 f"flow before being reported, {records_lost} record(s) dropped by capture, "
                 f"{total} event(s) dropped between stages", "capture", facts)


# ------------------------------------------------------------------ reading a run dir


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _json_file(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _marker_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip().split("=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def stage_states(run_dir: Path, stage_names) -> tuple[dict[str, StageState], dict[str, dict]]:
    """Each stage's state (from its markers) and latest counters."""
    stages, counters = {}, {}
    for name in stage_names:
        written = _json_file(run_dir / f"{name}.counters.json") or {}
        values, threads = written.get("counters", {}), written.get("threads") or {}
        if values:
            counters[name] = values
        pid = _marker_pid(run_dir / f"{name}.ready")
        failed = run_dir / f"{name}.failed"
        layers = _json_file(run_dir / f"{name}.layers.json") or {}
        if pid is not None and pid_alive(pid):
            stages[name] = StageState(name, "ready", pid, "", values, threads)
        elif failed.exists():
            text = failed.read_text(errors="replace").strip()
            stages[name] = StageState(name, "failed", None, text, values, threads)
        elif isinstance(layers.get("pid"), int) and pid_alive(layers["pid"]):
            stages[name] = StageState(name, "starting", layers["pid"], "", values, threads)
        else:
            stages[name] = StageState(name, "down", None, "", values, threads)
    return stages, counters


def live_reports(run_dir: Path) -> dict[str, tuple[str, dict]]:
    """layer -> (stage, report) from the layers files of stages that are alive."""
    reports = {}
    for path in sorted(run_dir.glob("*.layers.json")):
        data = _json_file(path)
        if not data or not isinstance(data.get("pid"), int) or not pid_alive(data["pid"]):
            continue
        for name, report in (data.get("layers") or {}).items():
            if name in BY_NAME and isinstance(report, dict):
                reports[name] = (str(data.get("stage", path.name.split(".")[0])), report)
    return reports


def requested_layers(settings) -> dict[str, bool]:
    """What the settings ask for, for layers no live stage reports (every other layer is
    always requested). SLUICE_DNS_REDIRECT is a flag; before it exists, nothing asks."""
    return {"dns_redirect": getattr(settings, "dns_redirect", False) is True}


def read_posture(settings, stage_names) -> Posture:
    run_dir = settings.run_dir
    stages, counters = stage_states(run_dir, stage_names)
    attachment = _json_file(run_dir / "attachment.json")
    return combine(live_reports(run_dir), stages, requested_layers(settings), counters,
                   attachment)


# ------------------------------------------------------------------ showing it


def table(posture: Posture) -> str:
    """The short plain form of `sluice status`."""
    rows = [("layer", "state", "detail")]
    rows += [(layer.name, layer.state, layer.detail) for layer in posture.layers.values()]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:{width[0]}}  {r[1]:{width[1]}}  {r[2]}" for r in rows]
    lines.append("")
    stage_rows = [("stage", "state", "counters")]
    for s in posture.stages.values():
        text = s.detail if s.state == "failed" else " ".join(
            f"{k}={v}" for k, v in s.counters.items())
        stage_rows.append((s.name, s.state, text))
        if s.threads:  # helper threads (pipeline/workers.py): alive, dead, stopped
            stage_rows.append(("", "", "threads: " + ", ".join(
                f"{thread} {state}" for thread, state in s.threads.items())))
    width = [max(len(r[i]) for r in stage_rows) for i in range(2)]
    lines += [f"{r[0]:{width[0]}}  {r[1]:{width[1]}}  {r[2]}".rstrip() for r in stage_rows]
    lines.append("")
    lines += accounting.lines({s.name: s.counters for s in posture.stages.values()})
    problems = posture.problems()
    if problems:
        lines.append("")
        lines += [f"NOT FULLY ON: {line}" for line in problems]
    return "\n".join(lines) + "\n"
