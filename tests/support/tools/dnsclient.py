"""DNS clients the redirect tests run inside a namespace; one JSON line on stdout.

`python -m tests.support.tools.dnsclient ask SERVER NAME [--type A] [--via udp|connected|tcp]`
    asks SERVER directly (never the resolv.conf one) and reports the answer's rcode and
    records and the address it came from (recvfrom for UDP, getpeername for the others):
    what the client itself sees.
`python -m tests.support.tools.dnsclient resolve-connect PORT NAME... [--parallel N] [--family 4|6]`
    resolves each name through the system resolver (glibc, this namespace's resolv.conf)
    and connects at once, N names at a time, like a real program; reports each connection's
    time and the namespace's retransmitted TCP segments (a dropped first SYN is one).
Both name the process (--name) so records can be matched to it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import json
import os
import socket
import time
from pathlib import Path

PR_SET_NAME = 15


def ask(server: str, name: str, rdtype: str, via: str, timeout: float) -> dict:
    import dns.message
    import dns.rcode

    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    query = dns.message.make_query(name, rdtype)
    wire = query.to_wire()
    kind = socket.SOCK_STREAM if via == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        try:
            if via == "udp":
                sock.sendto(wire, (server, 53))
                data, source = sock.recvfrom(65535)
            elif via == "connected":
                sock.connect((server, 53))
                sock.send(wire)
                data, source = sock.recvfrom(65535)
            else:
                sock.connect((server, 53))
                sock.sendall(len(wire).to_bytes(2, "big") + wire)
                data = _read_tcp_answer(sock)
                source = sock.getpeername()
        except OSError as err:
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    answer = dns.message.from_wire(data)
    return {"ok": True, "rcode": dns.rcode.to_text(answer.rcode()), "source": source[0],
            "port": source[1], "records": [r.to_text() for r in answer.answer],
            "id_matches": answer.id == query.id}


def _read_tcp_answer(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
        chunk = sock.recv(65535)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data[2:2 + int.from_bytes(data[:2], "big")]


def retransmitted_segments() -> int:
    """TcpRetransSegs of this network namespace."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


def resolve_connect(name: str, port: int, family: int) -> dict:
    started = time.monotonic()
    try:
        address = socket.getaddrinfo(name, port, family, socket.SOCK_STREAM)[0][4]
        resolved = time.monotonic()
        with socket.create_connection(address[:2], timeout=3) as conn:
            local = conn.getsockname()
        return {"name": name, "ip": address[0], "ok": True, "src_port": local[1],
                "connect_s": time.monotonic() - resolved}
    except OSError as err:
        return {"name": name, "ok": False, "error": str(err),
                "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("ask")
    one.add_argument("server")
    one.add_argument("qname")
    one.add_argument("--type", default="A")
    one.add_argument("--via", choices=["udp", "connected", "tcp"], default="udp")
    one.add_argument("--timeout", type=float, default=3.0)
    many = sub.add_parser("resolve-connect")
    many.add_argument("port", type=int)
    many.add_argument("names", nargs="+")
    many.add_argument("--parallel", type=int, default=1)
    many.add_argument("--family", type=int, choices=[4, 6], default=4)
    for p in (one, many):
        p.add_argument("--name", default="sl-dns")
    args = parser.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_NAME, args.name.encode(), 0, 0, 0)
    if args.what == "ask":
        result = ask(args.server, args.qname, args.type, args.via, args.timeout)
    else:
        family = socket.AF_INET6 if args.family == 6 else socket.AF_INET
        before = retransmitted_segments()
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda n: resolve_connect(n, args.port, family), args.names))
        result = {"results": results, "retransmitted": retransmitted_segments() - before}
    print(json.dumps({"pid": os.getpid(), **result}), flush=True)


if __name__ == "__main__":
    main()
