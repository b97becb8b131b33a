"""Flood benchmark: blocked UDP datagrams to many destinations through the whole pipeline.

Builds a client/server namespace pair, runs the real Procfile under honcho in the client
namespace (enforce mode, default deny), sends N datagrams each to a distinct flow (so the
kernel cannot aggregate them away), and reports packets sent, events the kernel emitted,
rows stored, every loss counter, stored events per second, and each stage's peak RSS.

Baseline, measured in the same run: the same flood with no classifier attached (how fast
the sender alone goes), and the kernel's event rate; ratios are printed against both.

    sudo .venv/bin/python benchmarks/flood.py [--packets 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns import Lab, base_env  # noqa: E402

VENV_BIN = Path(sys.executable).parent
STAGES = ("capture", "enrich", "policy", "persist", "notify")
SENDER = r"""
import socket, sys, time
n, spread = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
addrs = [(f"10.204.{(i % 60000) // 250}.{i % 250 + 1}", 10000 + i // 60000) for i in range(spread)]
sent = 0
start = time.perf_counter()
for i in range(n):
    try:
        s.sendto(b"x", addrs[i % spread]); sent += 1
    except OSError:
        sent += 1  # dropped by the classifier (ENOBUFS/EPERM): still a packet it judged
print(sent, time.perf_counter() - start)
"""


def counters(run_dir: Path, stage: str) -> dict:
    try:
        return json.loads((run_dir / f"{stage}.counters.json").read_text())["counters"]
    except (OSError, ValueError, KeyError):
        return {}


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stage_pids(run_dir: Path) -> dict[str, int]:
    return {s: int((run_dir / f"{s}.ready").read_text().split("=")[1]) for s in STAGES}


def send(lab: Lab, packets: int, spread: int) -> tuple[int, float]:
    out = subprocess.run(lab.exec_args(lab.client) + [sys.executable, "-c", SENDER, str(packets),
                                                      str(spread)],
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=300_000)
    args = parser.parse_args()
    spread = args.packets  # every datagram its own flow: the worst case for aggregation

    lab = Lab().create()
    # Every flooded destination is routed out of the client's veth.
    subprocess.run(["ip", "-n", lab.client, "route", "add", "default", "via", Lab.SERVER_V4],
                   check=True)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-flood-"))
    run_dir = tmp / "run"
    try:
        _, baseline_s = send(lab, args.packets, spread)

        (tmp / "policy.json").write_text('{"defaultAction": "deny"}')
        env = base_env(PATH=f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", SLUICE_MODE="enforce",
                       SLUICE_INTERFACE=lab.client_if, SLUICE_RUN_DIR=str(run_dir), SLUICE_JOURNAL_DIR=str(tmp / "journal"),
                       SLUICE_BPF_DIR=f"/sys/fs/bpf/sluice-b{lab.tag}",
                       SLUICE_DB=f"sqlite:///{tmp}/audit.db", SLUICE_AUDIT_LOG=str(tmp / "audit.jsonl"),
                       SLUICE_POLICY=str(tmp / "policy.json"), SLUICE_COUNTER_INTERVAL="0.5")
        honcho = lab.start_pipeline(env, open(tmp / "honcho.log", "w"))
        pids = stage_pids(run_dir)
        cpu_before = {s: cpu_seconds(pid) for s, pid in pids.items()}

        start = time.perf_counter()
        sent, send_s = send(lab, args.packets, spread)
        last, last_change = -1, time.perf_counter()
        while time.perf_counter() - last_change < 3.0:
            stored = counters(run_dir, "persist").get("rows_inserted", 0)
            if stored != last:
                last, last_change = stored, time.perf_counter()
            time.sleep(0.05)
        stored_s = last_change - start
        rss = {s: peak_rss_kib(pid) for s, pid in pids.items()}
        cpu = {s: cpu_seconds(pid) - cpu_before[s] for s, pid in pids.items()}
        honcho.send_signal(signal.SIGINT)
        honcho.wait(30)
        subprocess.run(lab.exec_args(lab.client) + [str(VENV_BIN / "sluice"), "detach"], env=env,
                       capture_output=True)
        report(sent, send_s, baseline_s, stored_s, rss, cpu,
               {s: counters(run_dir, s) for s in STAGES})
    finally:
        lab.close()


def report(sent, send_s, baseline_s, stored_s, rss, cpu, stage_counters) -> None:
    capture, persist = stage_counters["capture"], stage_counters["persist"]
    events = capture.get("kernel_events", 0)
    rows = persist.get("rows_inserted", 0)
    print(f"packets sent              {sent}")
    print(f"sender alone (baseline)   {sent / baseline_s:,.0f} packets/s")
    print(f"sender with sluice        {sent / send_s:,.0f} packets/s "
          f"(ratio {baseline_s / send_s:.2f} of baseline)")
    print(f"kernel: packets judged    {capture.get('kernel_packets', 0)}, denied "
          f"{capture.get('kernel_denied', 0)}")
    print(f"kernel: events emitted    {events}, aggregated {capture.get('kernel_aggregated', 0)}, "
          f"ring-buffer full {capture.get('kernel_ringbuf_full', 0)}")
    print(f"rows stored               {rows}")
    print(f"stored events/s           {rows / stored_s:,.0f} "
          f"(ratio to sender-alone packet rate {rows / stored_s / (sent / baseline_s):.2f})")
    losses = {f"{s}.{k}": v for s, c in stage_counters.items() for k, v in c.items()
              if ("dropped" in k or "malformed" in k or "short" in k or "full" in k) and v}
    print(f"loss counters             {losses or 'all zero'}")
    tails = capture.get("flow_tails_reported", 0)
    print(f"records read by capture   {capture.get('records_read', 0)} (+ flow tails {tails})")
    # Every denied packet is a row, or a record the ring buffer refused whose count the flow
    # sweep did not recover (its flow entry was evicted first): both are counted.
    unexplained = capture.get("kernel_denied", 0) - rows - (
        capture.get("kernel_ringbuf_full", 0) - tails)
    print(f"unexplained loss          {unexplained} (denied packets - rows - unrecovered "
          f"ring-buffer refusals)")
    print("peak RSS (MiB)            " + ", ".join(f"{s} {v / 1024:.0f}" for s, v in rss.items()))
    print("CPU seconds (flood)       " + ", ".join(f"{s} {v:.1f}" for s, v in cpu.items()))


if __name__ == "__main__":
    main()
