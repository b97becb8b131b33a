"""Test traffic generator run inside a namespace: `python -m tests.tools.netclient ...`.

Names itself (prctl) so tests can assert the process name the kernel recorded, and prints
one JSON line with its pid and what happened.
"""

import argparse
import ctypes
import json
import os
import socket
import time

PR_SET_NAME = 15


def set_name(name: str) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def tcp(host: str, port: int, timeout: float) -> dict:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    start = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            sock.sendall(b"ping\n")
            data = sock.recv(64)
            return {"ok": True, "reply": data.decode(), "seconds": time.monotonic() - start}
        except OSError as err:
            return {"ok": False, "error": str(err), "seconds": time.monotonic() - start}


def udp(host: str, port: int, count: int, spread: int) -> dict:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sent = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            try:
                sock.sendto(b"x", (host, port + (i % spread)))
                sent += 1
            except OSError:
                pass
    return {"ok": True, "sent": sent}


def raw(host: str, proto: int, count: int) -> dict:
    """ICMP echo (proto 1) or a bare GRE/other-protocol packet."""
    payload = b"\x08\x00\xf7\xff\x00\x00\x00\x00" if proto == 1 else b"\x00\x00\x08\x00"
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) as sock:
        for _ in range(count):
            try:
                sock.sendto(payload, (host, 0))
                sent += 1
            except OSError:
                pass
    return {"ok": True, "sent": sent}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["tcp", "udp", "raw"])
    parser.add_argument("host")
    parser.add_argument("port", type=int, help="port, or protocol number for raw")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--spread", type=int, default=1, help="udp: cycle over this many ports")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--name", default="sl-client")
    args = parser.parse_args()
    set_name(args.name)
    if args.mode == "tcp":
        result = tcp(args.host, args.port, args.timeout)
    elif args.mode == "udp":
        result = udp(args.host, args.port, args.count, args.spread)
    else:
        result = raw(args.host, args.port, args.count)
    print(json.dumps({"pid": os.getpid(), **result}), flush=True)


if __name__ == "__main__":
    main()
