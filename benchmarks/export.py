"""Export benchmark: records/s the export stage delivers against records/s persist stores.

Runs the real `sluice run persist` and `sluice run export` as processes on one SQLite store,
with a local OTLP/HTTP collector (a thread that counts the records of each request), and
pushes N audit records (a flood: blocked UDP to many destinations, as benchmarks/flood.py
sends) into persist's inbox as fast as it takes them. In the same run:

1. the flood with the export running beside persist: stored/s (the baseline: the rate the
   flood benchmark's pipeline is bounded by), the export's lag when persist stored its last
   row and how long it needed after that;
2. export's own pace: with the export stopped, N more records are stored; then the export
   starts and delivers that backlog: exported/s from its ready marker to the last record.

The export keeps up when exported/s is at least stored/s (ratio >= 1.0): a flood then never
builds a backlog that grows. --syslog also sends every record as syslog over UDP to a local
socket and reports that sink's pace on the backlog too.

    .venv/bin/python benchmarks/export.py [--records 200000] [--syslog]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (  # noqa: E402
    ExportLogsServiceRequest)

from pipeline import messages  # noqa: E402
from pipeline.audit.records import AuditEvent, new_event_id  # noqa: E402
from pipeline.topology import inbox_address  # noqa: E402

VENV_BIN = Path(sys.executable).parent
T0 = 1_767_225_600_000_000_000
BATCH = 512


class Collector:
    """Counts the log records of each OTLP request (the protobuf is parsed in C)."""

    def __init__(self) -> None:
        self.records = 0
        self.last = 0.0
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = gzip.decompress(self.rfile.read(int(self.headers["Content-Length"])))
                request = ExportLogsServiceRequest.FromString(body)
                count = sum(len(s.log_records) for r in request.resource_logs
                            for s in r.scope_logs)
                with collector.lock:
                    collector.records += count
                    collector.last = time.perf_counter()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"


class SyslogCounter:
    """Counts the datagrams that reach a local UDP port."""

    def __init__(self) -> None:
        self.messages, self.last = 0, 0.0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.sock.recv(65536)
            self.messages += 1
            self.last = time.perf_counter()


def make_batches(n: int, offset: int) -> list[bytes]:
    frames = []
    for start in range(offset, offset + n, BATCH):
        records = []
        for i in range(start, min(offset + n, start + BATCH)):
            ns = T0 + i * 20_000
            records.append(AuditEvent(
                ns, "connection_blocked", "10.0.0.2", f"10.204.{i % 240}.{i % 250 + 1}", "",
                10000 + i % 50000, "UDP", "flood", 4000 + i % 300, blocked=True,
                event_id=new_event_id(ns), host="bench-host"))
        frames.append(messages.encode(records))
    return frames


def counters(run_dir: Path, stage: str) -> dict:
    try:
        return json.loads((run_dir / f"{stage}.counters.json").read_text())["counters"]
    except (OSError, ValueError, KeyError):
        return {}


def wait_ready(run_dir: Path, stage: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not (run_dir / f"{stage}.ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{stage} did not start (exit {proc.returncode})")
        time.sleep(0.05)


def start(stage: str, env: dict, run_dir: Path) -> subprocess.Popen:
    with open(run_dir.parent / f"{stage}.log", "a") as log:
        proc = subprocess.Popen([str(VENV_BIN / "sluice"), "run", stage], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    wait_ready(run_dir, stage, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


def push_all(run_dir: Path, frames: list[bytes]) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(inbox_address(run_dir, "persist"))
    for frame in frames:
        push.send(frame)  # blocks at the high-water mark: as fast as persist takes them
    push.close(linger=-1)
    ctx.term()


def wait_until(predicate, what: str, timeout: float = 120) -> float:
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.005)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--syslog", action="store_true", help="also send syslog over UDP")
    args = parser.parse_args()
    n = args.records

    tmp = Path(tempfile.mkdtemp(prefix="sluice-export-"))
    run_dir = tmp / "run"
    collector = Collector()
    syslog = SyslogCounter()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")},
           "SLUICE_RUN_DIR": str(run_dir), "SLUICE_DB": f"sqlite:///{tmp}/audit.db",
           "SLUICE_AUDIT_LOG": str(tmp / "audit.jsonl"), "SLUICE_HOST": "bench-host",
           "SLUICE_COUNTER_INTERVAL": "0.2", "SLUICE_OTLP_ENDPOINT": collector.endpoint,
           "SLUICE_BPF_DIR": str(tmp / "no-bpffs")}
    if args.syslog:
        env["SLUICE_SYSLOG"] = f"udp://127.0.0.1:{syslog.port}"
    first, second = make_batches(n, 0), make_batches(n, n)

    def stored() -> int:
        return counters(run_dir, "persist").get("rows_inserted", 0)

    persist = start("persist", env, run_dir)
    export = start("export", env, run_dir)
    try:
        # 1. The flood with the export running beside persist.
        began = time.perf_counter()
        push_all(run_dir, first)
        stored_at = wait_until(lambda: stored() >= n, "persist to store the flood")
        lag = n - collector.records
        wait_until(lambda: collector.records >= n, "the export of the flood")
        tail = collector.last - stored_at
        stored_rate = n / (stored_at - began)
        if args.syslog:
            wait_until(lambda: syslog.messages >= n, "the syslog messages of the flood")
        # 2. Export's own pace: the same number of records waiting, persist idle.
        stop(export)
        push_all(run_dir, second)
        wait_until(lambda: stored() >= 2 * n, "persist to store the backlog")
        export = start("export", env, run_dir)
        restarted = time.perf_counter()
        wait_until(lambda: collector.records >= 2 * n, "the export of the backlog")
        drain_rate = n / (collector.last - restarted)
        if args.syslog:  # every flood record is a block: one message each
            wait_until(lambda: syslog.messages >= 2 * n, "the syslog messages of the backlog")
            syslog_rate = n / (syslog.last - restarted)
    finally:
        stop(export)
        stop(persist)
    ratio = drain_rate / stored_rate
    print(f"records                    {n} per phase")
    print(f"stored/s (persist)         {stored_rate:,.0f}  (baseline: the flood, export beside it)")
    print(f"export lag at last store   {lag} records; all exported {max(0.0, tail):.2f} s later")
    print(f"exported/s (OTLP backlog)  {drain_rate:,.0f}  (ratio {ratio:.2f} of stored/s)")
    if args.syslog:
        print(f"syslog/s (UDP, backlog)    {syslog_rate:,.0f}  (ratio "
              f"{syslog_rate / stored_rate:.2f} of stored/s)")
    print(f"export counters            {counters(run_dir, 'export')}")
    print(f"collector got              {collector.records} records ({2 * n} stored); "
          f"logs in {tmp}")
    keeps_up = ratio >= 1.0 and collector.records == 2 * n and (
        not args.syslog or syslog_rate >= stored_rate)
    print("verdict                    " + ("export keeps up with persist" if keeps_up else
                                           "export falls behind persist"))
    sys.exit(0 if keeps_up else 1)


if __name__ == "__main__":
    main()
