"""Blocked-traffic generator run inside a test namespace:
`python -m tests.support.tools.flood N ...`.

Sends N UDP datagrams, each to its own destination (address, port), so the classifier can
aggregate none of them: a scan or an exfiltration burst (with --per-flow, that many datagrams
to each destination, one after another: the kernel folds all but the first into its flow).
Prints one JSON line: how many were judged (sent, or refused by the classifier with
ENOBUFS/EPERM) and any other errors.
"""

import argparse
import errno
import json
import socket
import time

JUDGED = {errno.ENOBUFS, errno.EPERM}


def destinations(count: int, addresses: list[str], first_port: int):
    per_address = 65536 - first_port
    for i in range(count):
        yield addresses[i // per_address], first_port + i % per_address


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", type=int)
    parser.add_argument("--to", nargs="+", default=["10.202.0.1", "10.202.0.2", "10.202.0.3"])
    parser.add_argument("--first-port", type=int, default=1024)
    parser.add_argument("--per-second", type=float, default=0, help="0: as fast as possible")
    parser.add_argument("--per-flow", type=int, default=1, help="datagrams to each destination")
    args = parser.parse_args()
    judged, errors = 0, {}
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for n, target in enumerate(destinations(args.count, args.to, args.first_port)):
            if args.per_second and n % 100 == 0:
                ahead = n / args.per_second - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            for _ in range(args.per_flow):
                try:
                    sock.sendto(b"x", target)
                    judged += 1
                except OSError as err:
                    if err.errno in JUDGED:
                        judged += 1
                    else:
                        errors[err.strerror] = errors.get(err.strerror, 0) + 1
    print(json.dumps({"judged": judged, "errors": errors,
                      "seconds": time.monotonic() - start}))


if __name__ == "__main__":
    main()
