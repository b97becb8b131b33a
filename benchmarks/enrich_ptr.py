"""Enrich under slow reverse DNS: 0% and 50% unknown addresses while every PTR answer takes 2 s.

Part 1, the enrich stage alone (any machine). enrich runs as its own process, its reverse
lookups pointed at a local DNS server that answers every PTR question 2 s late (after
enrich's 500 ms budget). The known-name stream is the same in both cases; the 50% case adds
as many events to new addresses, each a distinct one (the worst case: every one wants a
lookup). Baseline: the 0% case, measured in the same run.
  * paced: known-name events at --rate per second for --seconds. Reports events/s out,
    known-name events/s, known-name latency (from each event's own timestamp) and the ratio
    of known-name throughput 50% / 0% (target: at least 0.9).
  * max: --events known-name events pushed as fast as enrich takes them; capacity in
    events/s, and the same known-name ratio.
Part 2, with --kernel as well (root and bcc): the real Procfile under honcho in a namespace
pair, the PTR server in the server namespace as the client's resolver, and paced UDP floods
through the classifier to distinct flows (known addresses named by DNS mappings pushed into
enrich; in the 50% case a second sender as fast to new addresses). Reports capture's drop
counters (target: zero) and enrich's named events/s against the senders' real pace.

    .venv/bin/python benchmarks/enrich_ptr.py [--rate 20000] [--seconds 5] [--events 200000]
    sudo .venv/bin/python benchmarks/enrich_ptr.py --kernel [--rate 20000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.flood import counters  # noqa: E402
from pipeline import messages  # noqa: E402
from pipeline.events import DnsMapping, EnrichedEvent, RawEvent  # noqa: E402
from pipeline.loop import run_stage  # noqa: E402
from pipeline.names.reverse import ReverseResolver  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.stages.enrich import EnrichStage  # noqa: E402
from pipeline.topology import inbox_address  # noqa: E402
from tests.support.netns import PYTHON, Lab, base_env  # noqa: E402

VENV_BIN = Path(sys.executable).parent
KNOWN = 1_000
BATCH = 256           # events per message, about what capture sends under load
PTR_DELAY_S = 2.0
# positions in an enriched_events record, from its definition (a new field moves them)
DST_IP, TIMESTAMP, HOSTNAME = (EnrichedEvent.__struct_fields__.index(name)
                               for name in ("dst_ip", "timestamp_ns", "dst_hostname"))


def known_ip(i: int) -> str:
    return f"10.205.{i % KNOWN // 250}.{i % 250 + 1}"


def unknown_ip(j: int) -> str:
    return f"10.{206 + j // 62500}.{j // 250 % 250}.{j % 250 + 1}"


def mappings() -> list[DnsMapping]:
    return [DnsMapping(f"host{i}.example.com", [known_ip(i)], 3600, [], time.time_ns())
            for i in range(KNOWN)]


def event(dst: str, now_ns: int, n: int) -> RawEvent:
    return RawEvent(4, False, 17, 0, "10.201.0.1", dst, 40000, 10000 + n % 50000, now_ns,
                    4242, "bench", 1, "", 0, "")


def stream(share: float, count: int, now_ns: int, start: int) -> list[RawEvent]:
    """count known-name events from index start, each followed by one to a new address
    when share is 0.5."""
    out = []
    for n in range(start, start + count):
        out.append(event(known_ip(n), now_ns, n))
        if share:
            out.append(event(unknown_ip(n), now_ns, n))
    return out


# ------------------------------------------------------------------ part 1: enrich alone

def _enrich_process(run_dir: str, ptr_port: int) -> None:
    settings = Settings.from_env({"SLUICE_RUN_DIR": run_dir, "SLUICE_COUNTER_INTERVAL": "0.5",
                                  "SLUICE_LOG_LEVEL": "WARNING"})
    resolver = ReverseResolver("127.0.0.1", port=ptr_port)
    sys.exit(run_stage(EnrichStage(resolver), settings))


@dataclasses.dataclass
class Arrivals:
    """What reached the policy inbox: per event, when, whether named, its latency."""

    when: list[float] = dataclasses.field(default_factory=list)
    named: list[bool] = dataclasses.field(default_factory=list)
    latency: list[float] = dataclasses.field(default_factory=list)


def receive(sock: zmq.Socket, expected: int, arrivals: Arrivals, quiet_s: float = 3.0) -> None:
    while len(arrivals.when) < expected and sock.poll(int(quiet_s * 1000)):
        records = msgpack.unpackb(sock.recv())["records"]
        now, now_ns = time.perf_counter(), time.time_ns()
        for record in records:
            arrivals.when.append(now)
            arrivals.named.append(bool(record[HOSTNAME]))
            arrivals.latency.append((now_ns - record[TIMESTAMP]) / 1e9)


def send_paced(push: zmq.Socket, share: float, rate: int, seconds: float) -> int:
    per_batch = BATCH // (2 if share else 1)  # known-name events per message
    start, sent = time.perf_counter(), 0
    while sent < rate * seconds:
        time.sleep(max(0.0, start + sent / rate - time.perf_counter()))
        push.send(messages.encode(stream(share, per_batch, time.time_ns(), sent)))
        sent += per_batch
    return sent


def send_max(push: zmq.Socket, share: float, events: int) -> int:
    per_batch = BATCH // (2 if share else 1)
    frames = [messages.encode(stream(share, per_batch, time.time_ns(), n))
              for n in range(0, events, per_batch)]
    for frame in frames:
        push.send(frame)
    return len(frames) * per_batch


def enrich_case(share: float, ptr_port: int, send) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="sluice-enrich-ptr-"))
    stage = multiprocessing.Process(target=_enrich_process, args=(str(run_dir), ptr_port))
    stage.start()
    while not (run_dir / "enrich.ready").exists():
        time.sleep(0.02)
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(inbox_address(run_dir, "policy"))
    push.connect(inbox_address(run_dir, "enrich"))
    push.send(messages.encode(mappings()))
    arrivals = Arrivals()
    receiver = threading.Thread(target=receive, args=(pull, 10**9, arrivals))
    receiver.start()
    started = time.perf_counter()
    known = send(push, share)
    receiver.join()
    stage.terminate()
    stage.join(10)
    result = summarize(arrivals, started, known, counters(run_dir, "enrich"))
    pull.close()
    push.close(linger=0)
    ctx.term()
    return result


def summarize(arrivals: Arrivals, started: float, known: int, stage_counters: dict) -> dict:
    named = [(t, lat) for t, ok, lat
             in zip(arrivals.when, arrivals.named, arrivals.latency, strict=True) if ok]
    latencies = sorted(lat for _, lat in named)
    last_known = max((t for t, _ in named), default=started)
    return {"events_out": len(arrivals.when), "known": known, "named": len(named),
            "events_per_s": len(arrivals.when) / max(1e-9, max(arrivals.when) - started),
            "known_per_s": len(named) / max(1e-9, last_known - started),
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0,
            "max_ms": 1000 * latencies[-1] if latencies else 0,
            "counters": {k: v for k, v in stage_counters.items()
                         if k.startswith(("ptr_", "held", "policy_dropped"))}}


def part_one(args) -> None:
    port = 18053
    server = subprocess.Popen([PYTHON, "-m", "tests.support.tools.ptrserver", "127.0.0.1",
                               str(port), "--delay", str(PTR_DELAY_S)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        for mode, send in (
                ("paced", lambda push, share: send_paced(push, share, args.rate, args.seconds)),
                ("max", lambda push, share: send_max(push, share, args.events))):
            results = {share: enrich_case(share, port, send) for share in (0.0, 0.5)}
            report_stage(mode, results)
    finally:
        server.terminate()
        server.wait()


def report_stage(mode: str, results: dict) -> None:
    base, half = results[0.0], results[0.5]
    print(f"\nenrich alone, {mode}: every PTR answer {PTR_DELAY_S:g} s late")
    for share, r in results.items():
        print(f"  {share:4.0%} unknown: {r['events_out']:>8} events out of "
              f"{r['known'] * (2 if share else 1)}, {r['events_per_s']:>9,.0f} events/s, "
              f"{r['known_per_s']:>9,.0f} known-name/s, named {r['named']}; known-name "
              f"latency p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms "
              f"max {r['max_ms']:.1f} ms")
        print(f"        counters {r['counters']}")
    print(f"  ratio known-name/s 50% / 0%: {half['known_per_s'] / base['known_per_s']:.2f} "
          f"(target >= 0.90); all events out: "
          f"{all(r['events_out'] == r['known'] * (2 if s else 1) for s, r in results.items())}")


# ------------------------------------------------------------------ part 2: through capture

SENDER = r"""
import socket, sys, time
rate, seconds, kind = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if kind == "known":  # 1,000 named addresses, a new port (a new flow) every 1,000 datagrams
    target = lambda i: (f"10.205.{i % 1000 // 250}.{i % 250 + 1}", 10000 + i // 1000)
else:                # a new address every datagram
    target = lambda i: (f"10.{206 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 9)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
start, n = time.perf_counter(), 0
while n < rate * seconds:
    time.sleep(max(0.0, start + n / rate - time.perf_counter()))
    for i in range(n, n + 100):
        try:
            s.sendto(b"x", target(i))
        except OSError:
            pass  # dropped by the classifier: still an event
    n += 100
print(time.perf_counter() - start)
"""


def flood(lab: Lab, args, share: float) -> list[float]:
    """One paced sender per kind of destination, side by side; each one's seconds."""
    kinds = ["known", "unknown"] if share else ["known"]
    senders = [subprocess.Popen(lab.exec_args(lab.client) + [
        PYTHON, "-c", SENDER, str(args.rate), str(args.seconds), kind],
        stdout=subprocess.PIPE, text=True) for kind in kinds]
    return [float(sender.communicate()[0]) for sender in senders]


def pipeline_case(lab: Lab, tmp: Path, share: float, args) -> dict:
    run_dir = tmp / f"run-{share:.1f}"
    env = base_env(PATH=f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", SLUICE_MODE="enforce",
                   SLUICE_INTERFACE=lab.client_if, SLUICE_RUN_DIR=str(run_dir),
                   SLUICE_JOURNAL_DIR=str(run_dir.parent / "journal"),
                   SLUICE_BPF_DIR=f"/sys/fs/bpf/sluice-p{lab.tag}",
                   SLUICE_DB=f"sqlite:///{tmp}/audit-{share:.1f}.db", SLUICE_AUDIT_LOG="",
                   SLUICE_POLICY=str(tmp / "policy.json"), SLUICE_COUNTER_INTERVAL="0.1",
                   SLUICE_CGROUP=str(lab.cgroup.path))
    honcho = lab.start_pipeline(env, open(tmp / "honcho.log", "a"))
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(inbox_address(run_dir, "enrich"))
    push.send(messages.encode(mappings()))
    push.close(linger=2000)
    ctx.term()
    started = time.perf_counter()
    send_seconds = flood(lab, args, share)
    until = {name: at - started for name, at in settle(run_dir).items()}
    result = {"capture": counters(run_dir, "capture"), "enrich": counters(run_dir, "enrich"),
              "until": until, "send_seconds": max(send_seconds)}
    honcho.send_signal(signal.SIGINT)
    honcho.wait(30)
    subprocess.run(lab.exec_args(lab.client) + [str(VENV_BIN / "sluice"), "detach"], env=env,
                   capture_output=True)
    return result


def settle(run_dir: Path) -> dict[str, float]:
    """When each watched counter last grew, once none has grown for 2 s."""
    watched = {"named": ("enrich", "events_named"), "sent": ("enrich", "policy_sent")}
    last: dict[str, int] = {}
    grew = dict.fromkeys(watched, time.perf_counter())
    while time.perf_counter() - max(grew.values()) < 2.0:
        for name, (stage, counter) in watched.items():
            value = counters(run_dir, stage).get(counter, 0)
            if value != last.get(name):
                last[name], grew[name] = value, time.perf_counter()
        time.sleep(0.05)
    return grew


def part_two(args) -> None:
    lab = Lab().create()
    subprocess.run(["ip", "-n", lab.client, "route", "add", "default", "via", Lab.SERVER_V4],
                   check=True)
    ptr = subprocess.Popen(lab.exec_args(lab.server) + [
        PYTHON, "-m", "tests.support.tools.ptrserver", Lab.SERVER_V4, "53", "--delay",
        str(PTR_DELAY_S)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lab.processes.append(ptr)
    netns_etc = Path("/etc/netns") / lab.client
    tmp = Path(tempfile.mkdtemp(prefix="sluice-enrich-ptr-"))
    try:
        assert ptr.stdout.readline().strip() == "ready"
        netns_etc.mkdir(parents=True)
        (netns_etc / "resolv.conf").write_text(f"nameserver {Lab.SERVER_V4}\n")
        (tmp / "policy.json").write_text('{"defaultAction": "deny"}')
        results = {share: pipeline_case(lab, tmp, share, args) for share in (0.0, 0.5)}
        report_pipeline(results, args)
    finally:
        (netns_etc / "resolv.conf").unlink(missing_ok=True)
        if netns_etc.exists():
            netns_etc.rmdir()
        lab.close()


def report_pipeline(results: dict, args) -> None:
    print(f"\nthrough capture (kernel), {args.rate} known-name datagrams/s for {args.seconds} s")
    kept_up = {}
    for share, r in results.items():
        capture, enrich, until = r["capture"], r["enrich"], r["until"]
        drops = {k: v for k, v in capture.items() if "dropped" in k or "full" in k}
        named = enrich.get("events_named", 0)
        offered = args.rate * args.seconds / r["send_seconds"]  # the senders' real pace
        kept_up[share] = named / until["named"] / offered
        print(f"  {share:4.0%} unknown: senders took {r['send_seconds']:.2f} s "
              f"({offered:,.0f} known-name datagrams/s); capture read "
              f"{capture.get('records_read', 0)}, drops {drops or 'none counted'}; enrich sent "
              f"{enrich.get('policy_sent', 0)}, named {named} ({named / until['named']:,.0f}/s, "
              f"{kept_up[share]:.2f} of the offered pace; last at {until['named']:.2f} s), "
              f"ptr lookups {enrich.get('ptr_lookups', 0)}, busy {enrich.get('ptr_busy', 0)}, "
              f"over budget {enrich.get('ptr_over_budget', 0)}, "
              f"held over limit {enrich.get('held_over_limit', 0)}")
    print(f"  ratio of named/s to offered pace, 50% / 0%: {kept_up[0.5] / kept_up[0.0]:.2f} "
          f"(target >= 0.90)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20_000, help="known-name events per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--events", type=int, default=200_000, help="known-name events, max run")
    parser.add_argument("--kernel", action="store_true", help="also part 2: through capture")
    args = parser.parse_args()
    part_one(args)
    if args.kernel:
        part_two(args)


if __name__ == "__main__":
    main()
