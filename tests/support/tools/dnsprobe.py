"""Resolve fresh names at a steady rate until told to stop:
`python -m tests.support.tools.dnsprobe`.

Run inside a test namespace against the DNS proxy. Each query asks a name never asked
before (n<i>.<suffix>), so every answer takes the proxy's full path: the upstream, then the
policy stage's map write before release. Stops when the file --stop-file exists (or after
--count queries) and prints one JSON line: each query's latency in ms, as the probe saw it
and as far as the answer's arrival at its socket (the kernel's receive timestamp: what is
left is the probe's own wait for a CPU), and the answer codes.
"""

import argparse
import json
import os
import socket
import time

import dns.message
import dns.rcode

from pipeline.dns.net.listeners import ANCILLARY_BYTES, SO_TIMESTAMPNS, arrival_ns


def ask(server: str, query: dns.message.Message, timeout: float) -> tuple[str, int, int, int]:
    """(rcode, sent, arrived at the socket, seen by the probe), in ns of CLOCK_REALTIME."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.connect((server, 53))
        sock.settimeout(timeout)
        wire = query.to_wire()
        sent = time.time_ns()
        sock.send(wire)
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(65535, ANCILLARY_BYTES)
            except TimeoutError:
                now = time.time_ns()
                return "TIMEOUT", sent, now, now
            seen = time.time_ns()
            answer = dns.message.from_wire(data)
            if answer.id != query.id:
                continue
            arrived = arrival_ns(ancillary) or seen
            return dns.rcode.to_text(answer.rcode()), sent, arrived, seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="127.0.0.1")
    parser.add_argument("--suffix", default="fresh.bench.test")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--per-second", type=float, default=20)
    parser.add_argument("--count", type=int, default=0, help="0: until --stop-file appears")
    parser.add_argument("--stop-file", default="")
    args = parser.parse_args()
    latencies, at_socket, rcodes = [], [], {}
    start = time.monotonic()
    n = 0
    while ((args.count and n < args.count)
           or (not args.count and not os.path.exists(args.stop_file))):
        wait = start + n / args.per_second - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        query = dns.message.make_query(f"n{args.first + n}.{args.suffix}", "A")
        code, sent, arrived, seen = ask(args.server, query, timeout=5)
        latencies.append((seen - sent) / 1e6)
        at_socket.append((arrived - sent) / 1e6)
        rcodes[code] = rcodes.get(code, 0) + 1
        n += 1
    print(json.dumps({"latencies_ms": latencies, "at_socket_ms": at_socket, "rcodes": rcodes}))


if __name__ == "__main__":
    main()
