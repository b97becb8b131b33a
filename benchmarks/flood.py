"""Flood benchmark: blocked UDP datagrams to many destinations through the whole pipeline.

Builds a client/server namespace pair, runs the real Procfile under honcho in the client
namespace (enforce mode, default deny, every stage), sends N datagrams each to a distinct
flow (so the kernel cannot aggregate them away), and meanwhile resolves fresh allowed names
through the DNS proxy. It ends when everything the kernel handed over is stored (capture's
journal holds nothing unstored and persist has a row for every record capture read), or at
a deadline, which it reports as a failure, never as a rate.

It prints in = out for the kernel and every stage; rows stored and stored events/s (the rows
over the time until persist had stored the last of them, as its counters show it every 0.2 s,
and over the time until capture's journal, which it reads once a second, said so too); packets
unrecoverable (the kernel could not even park them, or its flow map evicted them with their
flow before they were reported) and any unexplained difference; the peak RSS of each stage
and their total (after persist's rollups have caught up with the flood's rows, which it
stores apart from them while records keep coming: how long that took is printed too);
whether honcho had to SIGKILL a stage at the stop; and
the DNS answers' latency during the flood against the same with no flood (as the probe saw
it, and when each answer reached the probe's socket by the kernel's receive timestamp: the
difference is the probe's own wait for a CPU), whether that meets the target (at most
DNS_ADDED_P99_MS more at p99, every answer NOERROR), and where the time went: the dns
stage's own counters and histograms over the flood (a query's wait in the proxy's socket,
the upstream's round trip, the allow round trip to policy, the whole answer from query in
to answer out), each stage's CPU seconds, where each stage's loop spent the flood (on a
CPU, waiting for one, or asleep waiting for input, for room downstream or for a timer), and
the whole machine's CPU over the flood: the six stages (and their CPU a stored event), the
sender, everything else, idle; and how fast the CPU itself ran during the flood (on a
virtual machine the host can slow it for seconds at a time, and a run's CPU figures are read
with that).

Baselines, measured in the same run: the sender alone with no classifier (its packet rate),
and the DNS latency of the same proxy before the flood.

    sudo .venv/bin/python benchmarks/flood.py [--packets 300000] [--rate 0] [--busy-core]
                                              [--per-flow 1] [--trace-waits]

--busy-core keeps one core busy with an unrelated program for the whole run. --per-flow K
sends K datagrams to each destination: the kernel aggregates all but each flow's first, and
the run ends only once capture has claimed them too (or counted them as evicted with their
flow), so the flow map's accounting is checked end to end. --trace-waits also prints how
long the DNS probe waited for a CPU after each wake-up during the flood, and what held that
CPU meanwhile (benchmarks/probe_waits.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.netns import Lab, base_env  # noqa: E402

VENV_BIN = Path(sys.executable).parent
STAGES = ("capture", "enrich", "policy", "persist", "dns", "notify")
DEADLINE_S = 600
FRESH_NAMES = 20_000
RUN_DIR_IN_MEMORY = "/dev/shm"  # tmpfs
UPSTREAM_RT_PRIORITY = 1
# The no-flood baseline (30 s at the probe's 20 a second): its p99 is the sixth-slowest
# answer. With 200 it was the second-slowest, and the baseline p99 of one tree swung from
# 4 to 24 ms between runs, which the p99 the flood adds inherited.
QUIET_NAMES = 600
DNS_ADDED_P99_MS = 5.0  # the target: what the flood may add to a fresh answer's p99
SENDER = r"""
import os, socket, sys, time
n, rate, per_flow = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
addrs = [(f"10.204.{(i % 60000) // 250}.{i % 250 + 1}", 10000 + i // 60000) for i in range(n)]
sent = 0
start = time.perf_counter()
for i in range(n):
    if rate and i % 200 == 0:
        ahead = i / rate - (time.perf_counter() - start)
        if ahead > 0:
            time.sleep(ahead)
    try:
        s.sendto(b"x", addrs[i // per_flow]); sent += 1
    except OSError:
        sent += 1  # dropped by the classifier (ENOBUFS/EPERM): still a packet it judged
print(sent, time.perf_counter() - start, os.getpid())
"""
# The sender, the DNS client, the upstream and the busy program each lead a session of their
# own, as separate programs on a host do: where the kernel shares the CPU between sessions
# first (sched_autogroup), one session would make the client and the upstream (which stands
# for another machine) split the sender's share and time its flood instead of sluice.
OWN_SESSION = True
BUSY = "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"
# The CPU's own speed through the run: a fixed piece of Python work (about a millisecond)
# every 100 ms, timed by the CPU time it took (never by a wait for a CPU), stamped with
# perf_counter (CLOCK_MONOTONIC on Linux: the same clock in every process). On a virtual
# machine the host can halve the speed for seconds at a time, unseen as steal; a flood in
# such a stretch would spend twice the CPU an event.
SPEED_SAMPLER = r"""
import sys, time
out = open(sys.argv[1], "w", buffering=1)
while True:
    start, n = time.thread_time_ns(), 0
    for i in range(20_000):
        n += i * i
    out.write(f"{time.perf_counter()} {time.thread_time_ns() - start}\n")
    time.sleep(0.1)
"""


def counters(run_dir: Path, stage: str, part: str = "counters") -> dict:
    try:
        return json.loads((run_dir / f"{stage}.counters.json").read_text())[part]
    except (OSError, ValueError, KeyError):
        return {}


class CpuSpeed:
    """How fast the CPU itself ran during the flood (SPEED_SAMPLER): what the flood's CPU
    figures, and the rate they allow, are to be read with."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "cpu-speed.txt"
        self.proc = subprocess.Popen([sys.executable, "-c", SPEED_SAMPLER, str(self.path)],
                                     start_new_session=OWN_SESSION)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def line(self, start: float, end: float) -> str:
        """start, end: the flood's, by perf_counter."""
        took = []
        for line in self.path.read_text().splitlines():
            fields = line.split()  # the line being written may be cut short
            if len(fields) == 2 and start <= float(fields[0]) <= end:
                took.append(int(fields[1]) / 1e6)
        took.sort()
        if not took:
            return "CPU speed in the flood    no samples"
        return (f"CPU speed in the flood    a fixed piece of work took p50 "
                f"{statistics.median(took):.2f} ms of CPU, {took[0]:.2f} at its fastest, "
                f"{took[-1]:.2f} at its slowest ({len(took)} samples)")


def cpu_seconds(pid: int) -> float:
    """User and system time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LoopTimes:
    """Where each stage's main thread (its loop) spent the flood, from /proc/<pid>/schedstat:
    on a CPU, ready but waiting for one, or asleep in its poll (for input, for room
    downstream or for a timer). Which of the three dominates tells a stage that is short of
    CPU from one that waits on its neighbours."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = self._snapshot()
        self.spans: dict[str, tuple[float, float, float]] = {}

    def _snapshot(self) -> tuple[dict[str, tuple[int, int]], float]:
        times = {}
        for stage, pid in self.pids.items():
            try:
                on_cpu, waiting, _slices = Path(f"/proc/{pid}/schedstat").read_text().split()
            except (OSError, ValueError):
                continue  # a kernel that keeps no such figures: the line is left out
            times[stage] = (int(on_cpu), int(waiting))
        return times, time.monotonic()

    def stop(self) -> None:
        (start, t0), (end, t1) = self.before, self._snapshot()
        for stage in (s for s in start if s in end):  # in the stages' order
            run, wait = ((b - a) / 1e9 for a, b in zip(start[stage], end[stage], strict=True))
            self.spans[stage] = (run, wait, t1 - t0 - run - wait)

    def line(self) -> str:
        return "main thread in the flood  s on a CPU/waiting for one/asleep: " + ", ".join(
            f"{s} {run:.1f}/{wait:.1f}/{asleep:.1f}" for s, (run, wait, asleep)
            in self.spans.items())


class MachineCpu:
    """The whole machine's CPU over the flood, from /proc/stat, split into the six stages, the
    sender (its own time and the kernel's work done in its context: the classifier, the ring
    buffer) and everything else (the kernel's own threads, the probe; with --busy-core the
    busy program), with what stayed idle: how much of the CPU the pipeline had, and what it
    spent a stored event."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]  # idle, iowait
        stages = sum(cpu_seconds(pid) for pid in self.pids.values())
        return sum(fields[:8]) / tick, idle / tick, stages

    def stop(self, sender_s: float) -> None:
        self.after, self.sender_s = self._snapshot(), sender_s

    def line(self, rows: int) -> str:
        (total0, idle0, stages0), (total1, idle1, stages1) = self.before, self.after
        total, idle, stages = total1 - total0, idle1 - idle0, stages1 - stages0
        rest = total - idle - stages - self.sender_s
        return (f"machine in the flood      {total:.1f} CPU-s ({os.cpu_count()} CPUs): six stages "
                f"{stages:.1f} ({stages / max(rows, 1) * 1e6:.0f} µs a stored event), the sender "
                f"{self.sender_s:.1f}, everything else {rest:.1f}, idle {idle:.1f}")


class DnsWatch:
    """The dns stage's own view of the flood: its counters and latency histograms (a query's
    wait in the socket, the upstream's and policy's round trips, the whole answer) between two
    snapshots."""

    COUNTERS = ("queries", "servfail", "upstream_resends", "upstream_timeouts",
                "allow_failures", "late_allow_replies", "already_open")
    HISTOGRAMS = ("query_wait_seconds", "upstream_round_trip_seconds", "allow_round_trip_seconds",
                  "answer_latency_seconds")

    def __init__(self, run_dir: Path, pids: dict[str, int]) -> None:
        self.run_dir, self.pids = run_dir, pids
        self.before = self._snapshot()

    def _snapshot(self) -> tuple[dict, dict, dict]:
        return (counters(self.run_dir, "dns"), counters(self.run_dir, "dns", "histograms"),
                {s: cpu_seconds(pid) for s, pid in self.pids.items()})

    def lines(self) -> list[str]:
        (c0, h0, cpu0), (c1, h1, cpu1) = self.before, self._snapshot()
        out = ["dns stage in the flood     " + ", ".join(
            f"{name} {c1.get(name, 0) - c0.get(name, 0)}" for name in self.COUNTERS)]
        for name in self.HISTOGRAMS:
            if name in h1:
                counts = [b - a for a, b in zip(h0.get(name, {}).get("counts", [0] * len(
                    h1[name]["counts"])), h1[name]["counts"], strict=True)]
                bounds = h1[name]["bounds"]
                out.append(f"  {name:27} {sum(counts)} observed: p50 <= "
                           f"{bucket_bound(bounds, counts, 0.5)}, p99 <= "
                           f"{bucket_bound(bounds, counts, 0.99)}")
        out.append("CPU s in the flood        " + ", ".join(
            f"{s} {cpu1[s] - cpu0[s]:.1f}" for s in cpu1))
        return out


def bucket_bound(bounds: list[float], counts: list[int], q: float) -> str:
    """The histogram bucket holding quantile q, as its upper bound in ms."""
    total, running = sum(counts), 0
    for bound, count in zip([*bounds, None], counts, strict=True):
        running += count
        if total and running >= q * total:
            return "inf" if bound is None else f"{bound * 1000:g} ms"
    return "n/a"


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def stage_pids(run_dir: Path) -> dict[str, int]:
    return {s: int((run_dir / f"{s}.ready").read_text().split("=")[1]) for s in STAGES}


def children_cpu_seconds() -> float:
    """User and system time of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def send(lab: Lab, packets: int, rate: float, per_flow: int) -> tuple[int, float, int]:
    """(datagrams sent, seconds, the sender's process id)."""
    out = subprocess.run(lab.exec_args(lab.client) + [sys.executable, "-c", SENDER, str(packets),
                                                      str(rate), str(per_flow)],
                         check=True, capture_output=True, text=True,
                         start_new_session=OWN_SESSION).stdout.split()
    return int(out[0]), float(out[1]), int(out[2])


def probe(lab: Lab, stop_file: Path, first: int, count: int = 0) -> subprocess.Popen:
    args = ["--first", str(first), "--per-second", "20"]
    args += ["--count", str(count)] if count else ["--stop-file", str(stop_file)]
    return subprocess.Popen(lab.exec_args(lab.client) + [sys.executable, "-m",
                                                         "tests.support.tools.dnsprobe", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=OWN_SESSION)


def probed(proc: subprocess.Popen) -> dict:
    return json.loads(proc.communicate(timeout=60)[0])


def upstream(lab: Lab, tmp: Path) -> int:
    """Starts the test upstream; returns its process id."""
    zone = {f"n{i}.fresh.bench.test": {"A": ["10.202.0.4"], "ttl": 60}
            for i in range(FRESH_NAMES)}
    (tmp / "zone.json").write_text(json.dumps(zone))
    # It stands for another machine, which a flood on this one cannot slow: it runs real-time,
    # ahead of every ordinary thread here, so its CPU waits are not put on sluice. (At nice
    # -10, with dns and policy made real-time by hand, the proxy's answers still took up to
    # 25 ms at p99 while its allow round trip took at most 5 and its own wait 2.5: the rest
    # was the upstream's wait for a CPU.)
    proc = subprocess.Popen(lab.exec_args(lab.server) + [
        "chrt", "--rr", str(UPSTREAM_RT_PRIORITY), sys.executable, "-m",
        "tests.support.tools.dnsserver", f"{Lab.SERVER_V4}:53", str(tmp / "zone.json")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=OWN_SESSION)
    lab.processes.append(proc)
    assert proc.stdout.readline().strip() == "ready"
    return proc.pid


def persisted(run_dir: Path) -> bool:
    """persist has a row for every record capture read."""
    capture, persist = counters(run_dir, "capture"), counters(run_dir, "persist")
    read = capture.get("records_read", 0)
    # With --per-flow, packets after a flow's first wait in the kernel until capture claims
    # them, a window after the flow went quiet: every one taken (or counted as evicted).
    unclaimed = capture.get("kernel_aggregated", 0) - capture.get("kernel_tail_taken", 0) \
        - capture.get("kernel_evicted", 0)
    return (read > 0 and unclaimed <= 0
            and persist.get("rows_inserted", 0) + persist.get("duplicates_skipped", 0) >= read)


def everything_stored(run_dir: Path) -> bool:
    """persisted, and capture's journal says so too (it looks once a second)."""
    return (persisted(run_dir)
            and counters(run_dir, "capture").get("journal_unstored", 1) == 0)


def rolled_up(run_dir: Path, deadline: float) -> float:
    """Seconds until persist's rollups count every stored row (it stores a flood's rows
    apart from them and adds them once records stop), or until the deadline."""
    start = time.perf_counter()
    while (counters(run_dir, "persist").get("rollup_lag", 0)
           and time.perf_counter() < deadline):
        time.sleep(0.05)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=300_000)
    parser.add_argument("--rate", type=float, default=0, help="packets/s; 0: as fast as it can")
    parser.add_argument("--busy-core", action="store_true",
                        help="keep one core busy with an unrelated program for the whole run")
    parser.add_argument("--per-flow", type=int, default=1,
                        help="datagrams to each destination, back to back: the rest of a "
                             "flow's are aggregated, and reported when capture claims them")
    parser.add_argument("--trace-waits", action="store_true",
                        help="trace the probe's waits for a CPU during the flood and what its "
                             "CPU ran meanwhile (benchmarks/probe_waits.py)")
    args = parser.parse_args()

    busy = subprocess.Popen([sys.executable, "-c", BUSY], start_new_session=OWN_SESSION) \
        if args.busy_core else None
    lab = Lab().create()
    # Every flooded destination is routed out of the client's veth.
    subprocess.run(["ip", "-n", lab.client, "route", "add", "default", "via", Lab.SERVER_V4],
                   check=True)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-flood-"))
    # The run dir (sockets, counters files) in memory, as /run/sluice is on a host: on a busy
    # disk a stage's counters write could stall it for a second, which no host would see.
    run_dir = Path(tempfile.mkdtemp(prefix="sluice-flood-run-", dir=RUN_DIR_IN_MEMORY)) / "run"
    honcho = None
    waits = None
    speed = CpuSpeed(tmp)
    try:
        labels = {upstream(lab, tmp): "DNS upstream"}
        _, baseline_s, _ = send(lab, args.packets, args.rate, args.per_flow)

        (tmp / "policy.json").write_text(json.dumps({"defaultAction": "deny", "rules": [
            {"type": "hostname", "value": "*.fresh.bench.test", "action": "allow",
             "ports": [{"port": 443, "protocol": "tcp"}]}]}))
        env = base_env(PATH=f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", SLUICE_MODE="enforce",
                       SLUICE_INTERFACE=lab.client_if, SLUICE_RUN_DIR=str(run_dir),
                       SLUICE_JOURNAL_DIR=str(tmp / "journal"),
                       SLUICE_BPF_DIR=f"/sys/fs/bpf/sluice-b{lab.tag}",
                       SLUICE_DB=f"sqlite:///{tmp}/audit.db",
                       SLUICE_AUDIT_LOG=str(tmp / "audit.jsonl"),
                       SLUICE_POLICY=str(tmp / "policy.json"), SLUICE_COUNTER_INTERVAL="0.2",
                       SLUICE_DNS_UPSTREAM=f"{Lab.SERVER_V4}:53",
                       SLUICE_CGROUP=str(lab.cgroup.path))
        log = open(tmp / "honcho.log", "w")
        honcho = lab.start_pipeline(env, log)
        pids = stage_pids(run_dir)
        labels |= {pid: stage for stage, pid in pids.items()}
        if busy is not None:
            labels[busy.pid] = "busy program"
        if args.trace_waits:
            from benchmarks.probe_waits import ProbeWaits  # bcc only when asked
            waits = ProbeWaits(os.cpu_count() or 1)

        quiet = probed(probe(lab, tmp / "stop", first=0, count=QUIET_NAMES))
        time.sleep(1)  # the counters file catches up with the quiet probe
        watch = DnsWatch(run_dir, pids)
        dns_during = probe(lab, tmp / "stop", first=1000)
        if waits is not None:
            waits.watch(dns_during.pid)  # ip netns exec and the cgroup's sh exec it in place
        start = time.perf_counter()
        loops, machine = LoopTimes(pids), MachineCpu(pids)
        children_s = children_cpu_seconds()
        sent, send_s, sender_pid = send(lab, args.packets, args.rate, args.per_flow)
        labels[sender_pid] = "sender"
        sender_s = children_cpu_seconds() - children_s  # the one child that ended meanwhile
        deadline = start + DEADLINE_S
        persisted_s = None  # when the last row was stored, to the counters' interval
        while not everything_stored(run_dir) and time.perf_counter() < deadline:
            if persisted_s is None and persisted(run_dir):
                persisted_s = time.perf_counter() - start
            time.sleep(0.02)
        stored_s = time.perf_counter() - start
        persisted_s = persisted_s or stored_s
        rolled_in_flood = counters(run_dir, "persist").get("rows_rolled_up", 0)
        loops.stop()
        machine.stop(sender_s)
        complete = everything_stored(run_dir)
        (tmp / "stop").write_text("")
        flood = probed(dns_during)
        time.sleep(1)
        dns_lines = watch.lines()
        rolled_up_s = rolled_up(run_dir, deadline)  # peak RSS below includes the catch-up
        rss = {s: peak_rss_kib(pid) for s, pid in pids.items()}
        honcho.send_signal(signal.SIGINT)
        honcho.wait(30)
        log.close()
        subprocess.run(lab.exec_args(lab.client) + [str(VENV_BIN / "sluice"), "detach"], env=env,
                       capture_output=True)
        rows = report(args, sent, send_s, baseline_s, (persisted_s, stored_s), complete, rss,
                      {s: counters(run_dir, s) for s in STAGES}, tmp, quiet, flood)
        lag = counters(run_dir, "persist").get("rollup_lag", 0)
        print(f"rollups caught up         {rolled_up_s:.1f} s after the flood's last row was "
              f"stored ({rolled_in_flood} rows added to them before the run's end was seen)"
              if not lag
              else f"rollups caught up         NO: {lag} rows not counted by the rollups at "
              "the deadline (the views add them)")
        print("\n".join(dns_lines))
        if loops.spans:
            print(loops.line())
        print(machine.line(rows))
        print(speed.line(start, start + persisted_s))
        if waits is not None:
            print(waits.line(labels))
    finally:
        if waits is not None:
            waits.close()
        speed.close()
        if busy is not None:
            busy.kill()
        if honcho is not None and honcho.poll() is None:
            honcho.kill()
        lab.close()
        shutil.rmtree(run_dir.parent, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)  # the run's database, log and journal: 330 MB


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else (values[0] if values else float("nan"))


def report(args, sent, send_s, baseline_s, seconds, complete, rss, stage_counters, tmp,
           quiet, flood) -> int:
    """Print the run's figures; returns the flooded destinations' rows stored. seconds: until
    persist had stored the last row, and until capture's journal said so too."""
    c = stage_counters
    k = c["capture"]
    db = sqlite3.connect(f"file:{tmp}/audit.db?mode=ro", uri=True)
    rows = db.execute("SELECT COUNT(*) FROM audit_events WHERE event_type = "
                      "'connection_blocked' AND dst_ip LIKE '10.204.%'").fetchone()[0]
    # Every denied packet, flooded or not (enrich's own reverse lookups are denied too here).
    row_packets = db.execute(
        "SELECT COALESCE(SUM(packets), 0) FROM audit_events WHERE "
        "event_type IN ('connection_blocked', 'protocol_blocked')").fetchone()[0]
    db.close()
    print(f"machine                   {os.cpu_count()} cores"
          f"{', one kept busy by another program' if args.busy_core else ', quiet'}")
    print(f"packets sent              {sent} in {send_s:.2f} s")
    print(f"sender alone (baseline)   {sent / baseline_s:,.0f} packets/s")
    print(f"sender with sluice        {sent / send_s:,.0f} packets/s "
          f"(ratio {baseline_s / send_s:.2f} of baseline)")
    print(f"kernel                    judged {k.get('kernel_packets', 0)}, denied "
          f"{k.get('kernel_denied', 0)}, records {k.get('kernel_events', 0)}, ring buffer "
          f"full {k.get('kernel_ringbuf_full', 0)} -> parked {k.get('kernel_parked', 0)} "
          f"packets, not even parked {k.get('kernel_lost', 0)}, evicted with their flow "
          f"{k.get('kernel_evicted', 0)}")
    print(f"capture                   read {k.get('records_read', 0)} (swept from the "
          f"overflow map {k.get('overflow_swept', 0)}, flow tails "
          f"{k.get('flow_tails_reported', 0)}), journaled {k.get('records_journaled', 0)}, "
          f"sent {k.get('enrich_sent', 0)}")
    e = c["enrich"]
    print(f"enrich                    in {e.get('raw_events_received', 0)}, out "
          f"{e.get('policy_sent', 0)}; reverse lookups {e.get('ptr_lookups', 0)} (not made: "
          f"{e.get('ptr_busy', 0)} with every slot busy, {e.get('ptr_over_budget', 0)} over "
          f"the budget)")
    print(f"policy                    in {c['policy'].get('enriched_events_received', 0)}, out "
          f"{c['policy'].get('persist_sent', 0)} (notices {c['policy'].get('notify_sent', 0)} "
          f"sent, {c['policy'].get('notify_dropped', 0)} dropped); allow requests "
          f"{c['policy'].get('allow_requests_received', 0)}")
    print(f"persist                   in {c['persist'].get('audit_records_received', 0)}, "
          f"stored {c['persist'].get('rows_inserted', 0)}, duplicates "
          f"{c['persist'].get('duplicates_skipped', 0)}")
    flows = f" (records and claimed tails of {sent // args.per_flow} flows)" \
        if args.per_flow > 1 else ""
    print(f"rows stored               {rows} flooded destinations{flows}; "
          f"{row_packets} denied packets in all"
          f"{'' if complete else f'  FAILED: not everything stored within {DEADLINE_S} s'}")
    persisted_s, stored_s = seconds
    if complete:
        print(f"stored events/s           {rows / persisted_s:,.0f} (ratio to sender-alone "
              f"packet rate {rows / persisted_s / (sent / baseline_s):.2f}); "
              f"{rows / stored_s:,.0f} until capture's journal also said so")
    # Unrecoverable: refused by the ring buffer and the overflow map both, or evicted from the
    # flow map with their flow before a record or a claim took them.
    unrecoverable = k.get("kernel_lost", 0) + k.get("kernel_evicted", 0)
    unexplained = k.get("kernel_denied", 0) - row_packets - unrecoverable
    print(f"unrecoverable packets     {unrecoverable} "
          f"({unrecoverable / max(1, k.get('kernel_denied', 1)):.2%} of denied); "
          f"unexplained {unexplained} (denied - stored packets - unrecoverable)")
    print("peak RSS (MiB)            " + ", ".join(f"{s} {v / 1024:.0f}" for s, v in rss.items())
          + f"; total {sum(rss.values()) / 1024:.0f}")
    log = (tmp / "honcho.log").read_text()
    print(f"SIGKILL at the stop       {'yes' if 'SIGKILL' in log else 'no'}")
    for label, result in (("no flood (baseline)", quiet), ("during the flood", flood)):
        lat, sock = result["latencies_ms"], result["at_socket_ms"]
        print(f"DNS {label:21} {len(lat)} fresh names: p50 {percentile(lat, 50):.2f} ms, "
              f"p99 {percentile(lat, 99):.2f} ms (at the probe's socket: p50 "
              f"{percentile(sock, 50):.2f} ms, p99 {percentile(sock, 99):.2f} ms); "
              f"answers {result['rcodes']}")
    if quiet["latencies_ms"] and flood["latencies_ms"]:
        added, at_socket = (
            {p: percentile(flood[key], p) - percentile(quiet[key], p) for p in (50, 99)}
            for key in ("latencies_ms", "at_socket_ms"))
        print(f"DNS added by the flood    p50 {added[50]:+.2f} ms, p99 {added[99]:+.2f} ms "
              f"(at the probe's socket: p50 {at_socket[50]:+.2f} ms, p99 "
              f"{at_socket[99]:+.2f} ms; the rest is the probe's own wait for a CPU)")
        met = added[99] < DNS_ADDED_P99_MS and set(flood["rcodes"]) == {"NOERROR"}
        print(f"DNS target                added p99 under {DNS_ADDED_P99_MS:g} ms and every "
              f"answer NOERROR: {'met' if met else 'NOT met'}")
    return rows


if __name__ == "__main__":
    main()
