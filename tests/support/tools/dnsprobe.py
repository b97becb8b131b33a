"""Resolve fresh names at a steady rate until told to stop:
`python -m tests.support.tools.dnsprobe`.

Run inside a test namespace against the DNS proxy. Each query asks a name never asked
before (n<i>.<suffix>), so every answer takes the proxy's full path: the upstream, then the
policy stage's map write before release. Stops when the file --stop-file exists (or after
--count queries) and prints one JSON line: each query's latency in ms and the answer codes.
"""

import argparse
import json
import os
import time

import dns.exception
import dns.message
import dns.query
import dns.rcode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="127.0.0.1")
    parser.add_argument("--suffix", default="fresh.bench.test")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--per-second", type=float, default=20)
    parser.add_argument("--count", type=int, default=0, help="0: until --stop-file appears")
    parser.add_argument("--stop-file", default="")
    args = parser.parse_args()
    latencies, rcodes = [], {}
    start = time.monotonic()
    n = 0
    while ((args.count and n < args.count)
           or (not args.count and not os.path.exists(args.stop_file))):
        wait = start + n / args.per_second - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        query = dns.message.make_query(f"n{args.first + n}.{args.suffix}", "A")
        asked = time.perf_counter()
        try:
            answer = dns.query.udp(query, args.server, timeout=5)
            code = dns.rcode.to_text(answer.rcode())
        except dns.exception.Timeout:
            code = "TIMEOUT"
        latencies.append((time.perf_counter() - asked) * 1000)
        rcodes[code] = rcodes.get(code, 0) + 1
        n += 1
    print(json.dumps({"latencies_ms": latencies, "rcodes": rcodes}))


if __name__ == "__main__":
    main()
