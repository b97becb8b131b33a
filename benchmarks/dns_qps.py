"""Queries/s and added latency of the dns stage, cached and uncached, against dnsmasq.

Both proxies forward to the same upstream, measured in the same run with dnsperf:

  upstream   dnsmasq answering every name under bench.test itself (fast, C, TTL 300), so
             neither proxy waits on a slow authority and the comparison is of the proxies;
  dnsmasq    a second dnsmasq forwarding to it with a 10,000-entry cache: the baseline;
  sluice     `sluice run dns` in enforce mode and `sluice run policy` beside it, on real
             BPF maps that this script loads and pins (bcc) but attaches nowhere: the policy
             stage writes every new answer's addresses into them before it is released, and
             the proxy releases a cached answer whose addresses it already saw opened at the
             maps' current generation without asking again.

Added latency = a proxy's percentile minus the upstream's own (dnsperf straight at it).
Latency runs are rate-limited (no queueing); throughput runs keep QUERIES_OUTSTANDING queries
in flight. dnsperf and dnsmasq come from Debian (`dnsperf`, `dnsmasq-base`: the binary without
a system service) and are installed with apt-get when missing.

With --without-allow the policy is "allow everything, no rules": no answer needs the policy
stage, which shows what the just-in-time round trip costs.

The stages run from this script's tree (PYTHONPATH), so a copy of the script in a worktree of
another commit measures that commit under the same conditions.

Needs root, bcc (python3-bpfcc) and a bpffs, as the capture stage does.
Usage: sudo .venv/bin/python benchmarks/dns_qps.py [--seconds 5] [--without-allow]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.kernel.loader import load_classifier, remove_pins  # noqa: E402 - needs the path
from pipeline.settings import Settings  # noqa: E402

BIN = Path(sys.executable).parent
ZONE = "bench.test"
CACHED_NAMES = 100
LATENCY_QPS = 2000
LATENCY_QUERIES = 4000
QUERIES_OUTSTANDING = 100
SETTLE_S = 3.0   # longer than the dns stage waits for an allow reply
POLICY = {"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": ZONE, "action": "allow",
     "ports": [{"port": 443, "protocol": "tcp"}]}]}
NO_ALLOW_POLICY = {"defaultAction": "allow", "rules": []}


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("dnsperf", "dnsperf"), ("dnsmasq", "dnsmasq-base"))
               if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if not missing:
        return
    print(f"installing {', '.join(missing)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def dnsmasq(port: int, *options: str) -> subprocess.Popen:
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    return subprocess.Popen(
        [binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
         "--listen-address=127.0.0.1", f"--port={port}", "--pid-file=", "--user=root",
         *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ask(port: int, name: str) -> bool:
    import dns.message
    import dns.query

    try:
        dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=0.5)
        return True
    except Exception:  # noqa: BLE001 - not answering yet
        return False


def wait_until(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def dnsperf(port: int, names: Path, *options: str) -> tuple[float, list[float]]:
    """(queries per second, per-query latencies in seconds when -v was given)."""
    out = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(names),
                          "-t", "5", *options], capture_output=True, text=True, check=True).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
    if lost:
        print(f"  ({lost} queries lost)", flush=True)
    latencies = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("> ")]
    return qps, latencies


def percentile(values: list[float], fraction: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(fraction * 100) - 1]


def name_file(path: Path, names: list[str]) -> Path:
    path.write_text("".join(f"{name} A\n" for name in names))
    return path


class Bench:
    def __init__(self, work: Path, seconds: float) -> None:
        self.work, self.seconds = work, seconds
        self.unique = 0

    def fresh_names(self, label: str, count: int) -> Path:
        start, self.unique = self.unique, self.unique + count
        return name_file(self.work / f"{label}.txt",
                         [f"u{i}.{ZONE}" for i in range(start, start + count)])

    def measure(self, label: str, port: int) -> dict:
        cached = name_file(self.work / "cached.txt",
                           [f"c{i}.{ZONE}" for i in range(CACHED_NAMES)])
        dnsperf(port, cached, "-n", "1")  # warm the cache
        # Latency first, at a rate every proxy keeps up with: a saturating run leaves queues
        # behind it (requests of queries that gave up are still served by the policy stage).
        _, hit_latency = dnsperf(port, cached, "-v", "-Q", str(LATENCY_QPS),
                                 "-n", str(LATENCY_QUERIES // CACHED_NAMES))
        _, miss_latency = dnsperf(port, self.fresh_names(f"{label}-lat", LATENCY_QUERIES), "-v",
                                  "-Q", str(LATENCY_QPS // 2), "-n", "1")
        hit_qps, _ = dnsperf(port, cached, "-q", str(QUERIES_OUTSTANDING),
                             "-l", str(self.seconds))
        time.sleep(SETTLE_S)
        miss_qps, _ = dnsperf(port, self.fresh_names(f"{label}-qps", 400_000),
                              "-q", str(QUERIES_OUTSTANDING), "-l", str(self.seconds), "-n", "1")
        time.sleep(SETTLE_S)
        return {"cached_qps": hit_qps, "uncached_qps": miss_qps,
                "cached_p50": percentile(hit_latency, 0.5),
                "cached_p99": percentile(hit_latency, 0.99),
                "uncached_p50": percentile(miss_latency, 0.5),
                "uncached_p99": percentile(miss_latency, 0.99)}


def sluice_env(work: Path, upstream_port: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(SLUICE_RUN_DIR=str(work / "run"), SLUICE_JOURNAL_DIR=str(work / "journal"),
               SLUICE_POLICY=str(work / "policy.json"),
               SLUICE_BPF_DIR=f"/sys/fs/bpf/sluice-dns-bench-{os.getpid()}",
               SLUICE_MODE="enforce", SLUICE_LOG_LEVEL="WARNING", SLUICE_AUDIT_LOG="",
               SLUICE_DNS_LISTEN=f"127.0.0.1:{port}",
               SLUICE_DNS_UPSTREAM=f"127.0.0.1:{upstream_port}", PYTHONPATH=str(ROOT),
               SLUICE_DNS_REDIRECT="false")  # this machine's own namespace: no redirect
    return env


def start_sluice(work: Path, env: dict[str, str], policy: dict) -> list[subprocess.Popen]:
    (work / "policy.json").write_text(json.dumps(policy))
    stages = [subprocess.Popen([str(BIN / "sluice"), "run", stage], env=env, cwd=ROOT)
              for stage in ("policy", "dns")]
    for stage in ("policy", "dns"):
        wait_until(lambda stage=stage: (work / "run" / f"{stage}.ready").exists(),
                   f"the {stage} stage")
    return stages


def round_trips(work: Path) -> str:
    counters = json.loads((work / "run" / "dns.counters.json").read_text())["counters"]
    return (f"sluice answers: {counters.get('allow_requests', 0)} asked the policy stage, "
            f"{counters.get('already_open', 0)} were already open")


def report(results: dict[str, dict]) -> None:
    base = results["upstream"]
    print(f"\n{'':9} {'qps':>8} {'qps':>9} {'cached ms':>17} {'uncached ms':>17} "
          f"{'added p50 ms':>18}")
    print(f"{'':9} {'cached':>8} {'uncached':>9} {'p50':>8} {'p99':>8} {'p50':>8} {'p99':>8} "
          f"{'cached':>8} {'uncached':>9}")
    for label in ("upstream", "dnsmasq", "sluice"):
        r = results[label]
        ms = {key: r[key] * 1000 for key in r if "_p" in key}
        print(f"{label:9} {r['cached_qps']:8.0f} {r['uncached_qps']:9.0f} "
              f"{ms['cached_p50']:8.3f} {ms['cached_p99']:8.3f} "
              f"{ms['uncached_p50']:8.3f} {ms['uncached_p99']:8.3f} "
              f"{ms['cached_p50'] - base['cached_p50'] * 1000:8.3f} "
              f"{ms['uncached_p50'] - base['uncached_p50'] * 1000:9.3f}")
    print(f"({os.cpu_count()} CPUs shared by dnsperf, the upstream and the proxy's processes)")
    s, d = results["sluice"], results["dnsmasq"]
    print(f"\nsluice / dnsmasq: cached qps x{s['cached_qps'] / d['cached_qps']:.2f}, "
          f"uncached qps x{s['uncached_qps'] / d['uncached_qps']:.2f}, "
          f"cached p50 x{s['cached_p50'] / d['cached_p50']:.2f}, "
          f"uncached p50 x{s['uncached_p50'] / d['uncached_p50']:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5, help="length of each throughput run")
    parser.add_argument("--without-allow", action="store_true",
                        help="a policy under which no answer needs the policy stage")
    args = parser.parse_args()
    ensure_tools()
    ports = {label: free_port() for label in ("upstream", "dnsmasq", "sluice")}
    with tempfile.TemporaryDirectory(prefix="sluice-dns-bench-") as tmp:
        work = Path(tmp)
        processes = [dnsmasq(ports["upstream"], f"--address=/{ZONE}/10.1.2.3", "--local-ttl=300"),
                     dnsmasq(ports["dnsmasq"], f"--server=127.0.0.1#{ports['upstream']}",
                             "--cache-size=10000")]
        env = sluice_env(work, ports["upstream"], ports["sluice"])
        classifier = load_classifier(Settings.from_env(env))  # pins the maps, attaches nothing
        try:
            processes += start_sluice(work, env, NO_ALLOW_POLICY if args.without_allow else POLICY)
            for label, port in ports.items():
                wait_until(lambda port=port: ask(port, f"ready.{ZONE}"), label)
            bench = Bench(work, args.seconds)
            results = {}
            for label, port in ports.items():
                print(f"measuring {label} ...", flush=True)
                results[label] = bench.measure(label, port)
            report(results)
        finally:
            for proc in processes:
                proc.send_signal(signal.SIGTERM)
            for proc in processes:
                proc.wait(10)
            classifier.cleanup()
            remove_pins(Path(env["SLUICE_BPF_DIR"]))
        print(round_trips(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
