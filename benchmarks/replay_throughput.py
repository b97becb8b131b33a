"""Replay throughput: `--pace max` through enrich, policy and persist into SQLite (and PostgreSQL).

Writes a recording of N kernel events (to 2,000 named destinations, a quarter of them blocked)
plus their DNS mappings, starts the three stages as processes the way honcho would (policy
over the dict-backed maps, enrich without reverse lookups: a replay has no PTR answers), and
replays it as fast as enrich takes it, timing until persist has stored every row.

Baselines, measured in the same run: the replay's own ceiling (the same frames read and
pushed into a socket that only counts them), and what recording costs enrich per batch
against the msgpack encoding enrich pays anyway to forward that batch.

    .venv/bin/python benchmarks/replay_throughput.py [--events 200000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import messages  # noqa: E402
from pipeline.events import DnsMapping, RawEvent  # noqa: E402
from pipeline.loop import Counters, run_stage  # noqa: E402
from pipeline.recording import Header, Recorder, RecordingWriter  # noqa: E402
from pipeline.replay import NoReverseLookups, frames_of, replay_live  # noqa: E402
from pipeline.rulemaps import DictRuleMaps  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.stages.enrich import EnrichStage  # noqa: E402
from pipeline.topology import inbox_address  # noqa: E402
from pipeline.stages.persist import PersistStage  # noqa: E402
from pipeline.stages.policy import PolicyStage  # noqa: E402
from tests.support.postgres import postgres_schema  # noqa: E402

BATCH = 512
DESTINATIONS = 2_000
T0 = 1_767_225_600_000_000_000


def address(i: int) -> str:
    return f"10.{200 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


def write_recording(path: Path, events: int) -> None:
    clock = iter(range(T0, T0 + 10**15, 1_000_000))
    recorder = Recorder(RecordingWriter(path, 1 << 40, Header("bench", "audit", T0)),
                        Counters(), logging.getLogger("bench"), clock=lambda: next(clock))
    recorder.add("dns_mappings", [DnsMapping(f"host{i}.example.com", [address(i)], 3600, [], T0)
                                  for i in range(DESTINATIONS)])
    batch = []
    for n in range(events):
        i = n % DESTINATIONS
        batch.append(RawEvent(4, i % 4 != 0, 6, 0, "10.0.0.2", address(i), 30000 + n % 30000,
                              443, T0 + n * 1000, 1000 + i % 50, f"proc{i % 50}", 1, "", 0, ""))
        if len(batch) == BATCH:
            recorder.add("raw_events", batch)
            batch = []
    recorder.add("raw_events", batch)
    recorder.close()


def settings_for(tmp: Path, db: str) -> Settings:
    policy = tmp / "policy.json"
    policy.write_text(json.dumps({"defaultAction": "deny", "rules": [
        {"type": "hostname", "value": "*.example.com", "action": "allow",
         "ports": [{"port": 443, "protocol": "tcp"}]}]}))
    return Settings.from_env({
        "SLUICE_RUN_DIR": str(tmp / "run"), "SLUICE_JOURNAL_DIR": str(tmp / "journal"),
        "SLUICE_DB": db, "SLUICE_AUDIT_LOG": "",
        "SLUICE_POLICY": str(policy), "SLUICE_HOST": "bench", "SLUICE_COUNTER_INTERVAL": "0.1",
        "SLUICE_DNS_UPSTREAM": "127.0.0.53", "SLUICE_ALLOW_EXISTING_CONNECTIONS": "false",
        "SLUICE_LOG_LEVEL": "WARNING"})


def _run(name: str, settings: Settings) -> None:
    logging.basicConfig(level=logging.WARNING)
    stage = {"enrich": lambda: EnrichStage(reverse=NoReverseLookups()),
             "policy": lambda: PolicyStage(open_maps=lambda _s: DictRuleMaps()),
             "persist": PersistStage}[name]()
    sys.exit(run_stage(stage, settings))


def counter(settings: Settings, stage: str, name: str) -> int:
    try:
        path = settings.run_dir / f"{stage}.counters.json"
        return json.loads(path.read_text())["counters"].get(name, 0)
    except (OSError, ValueError):
        return 0


def through_pipeline(recording: Path, settings: Settings, events: int) -> float:
    """Seconds from the first frame sent until persist has stored every event."""
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_run, args=(name, settings)) for name in
             ("persist", "policy", "enrich")]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 30
        while not all((settings.run_dir / f"{s}.ready").exists()
                      for s in ("persist", "policy", "enrich")):
            if time.monotonic() > deadline:
                raise SystemExit("stages did not become ready")
            time.sleep(0.05)
        started = time.monotonic()
        replay_live([recording], settings.run_dir, None, lambda n: None)
        while counter(settings, "persist", "rows_inserted") < events:
            if time.monotonic() - started > 600:
                raise SystemExit("persist did not store every event within 10 minutes")
            time.sleep(0.02)
        return time.monotonic() - started
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(15)


def sender_ceiling(recording: Path, tmp: Path, events: int) -> float:
    """Seconds to read and push every frame into a sink that only counts records."""
    run_dir = tmp / "sink"
    run_dir.mkdir()
    ctx = zmq.Context()
    sink = ctx.socket(zmq.PULL)
    sink.bind(inbox_address(run_dir, "enrich"))
    received = []

    def drain() -> None:
        count = 0
        while count < events:
            _, records, _ = messages.decode(sink.recv())
            count += len(records) if records and isinstance(records[0], RawEvent) else 0
        received.append(count)

    thread = threading.Thread(target=drain)
    thread.start()
    started = time.monotonic()
    replay_live([recording], run_dir, None, lambda n: None)
    thread.join()
    took = time.monotonic() - started
    sink.close()
    ctx.term()
    return took


def recording_cost(recording: Path) -> tuple[float, float]:
    """Seconds per 1,000 events: the recorder's add+flush, and enrich's own encoding."""
    frames = [f for f in frames_of([recording]) if f.kind == "raw_events"]
    total = sum(len(f.records) for f in frames)
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Recorder(RecordingWriter(Path(tmp) / "r", 1 << 40, Header("b", "audit", 0)),
                            Counters(), logging.getLogger("bench"))
        started = time.perf_counter()
        for f in frames:
            recorder.add("raw_events", f.records)
            recorder.flush()
        recorded = time.perf_counter() - started
        recorder.close()
    started = time.perf_counter()
    for f in frames:
        messages.encode(f.records)
    encoded = time.perf_counter() - started
    return recorded / total * 1000, encoded / total * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--postgres", default="", help="PostgreSQL URL (a schema is created)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-replay-bench-") as name:
        tmp = Path(name)
        recording = tmp / "recording"
        write_recording(recording, args.events)
        size = recording.stat().st_size
        print(f"recording: {args.events:,} events + {DESTINATIONS:,} mappings, "
              f"{size / 1e6:.1f} MB ({size / args.events:.0f} bytes/event)")

        ceiling = sender_ceiling(recording, tmp, args.events)
        print(f"baseline, replay into a counting sink: {args.events / ceiling:,.0f} events/s")
        targets = [("SQLite", contextlib.nullcontext(f"sqlite:///{tmp}/audit.db"))]
        if args.postgres:
            targets.append(("PostgreSQL", postgres_schema(args.postgres)))
        for label, database in targets:
            (tmp / label).mkdir()
            with database as db:
                took = through_pipeline(recording, settings_for(tmp / label, db), args.events)
            rate = args.events / took
            print(f"replay --pace max, enrich -> policy -> persist -> {label}: {rate:,.0f} "
                  f"events/s end to end ({rate * ceiling / args.events:.2f}x the baseline)")

        recorded, encoded = recording_cost(recording)
        print(f"recording cost in enrich: {recorded * 1000:.2f} ms per 1,000 events, "
              f"{recorded / encoded:.2f}x the encoding enrich does anyway to forward them")


if __name__ == "__main__":
    main()
