"""The client the DNS end-to-end tests run in the lab's client namespace: it resolves through
the namespace's resolv.conf, as a real program would, and prints one JSON line.

`python -m tests.support.tools.resolvclient resolve-connect PORT NAME...`
    resolves each name with glibc and connects at once, so the SYN follows the answer as
    closely as a real program's would; reports each connection's time and the namespace's
    retransmitted TCP segments (a dropped first SYN is one).
`python -m tests.support.tools.resolvclient query NAME [RDTYPE]`
    asks the first nameserver of resolv.conf with dnspython, for the answer's rcode and records.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path


def _retransmitted_segments() -> int:
    """TcpRetransSegs of this network namespace (/proc/net/snmp)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Tcp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("RetransSegs")])


def resolve_connect(names: list[str], port: int) -> dict:
    before = _retransmitted_segments()
    results = []
    for name in names:
        started = time.monotonic()
        try:
            address = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
            resolved = time.monotonic()
            with socket.create_connection(address, timeout=3):
                pass
            results.append({"name": name, "ip": address[0], "ok": True,
                            "connect_s": time.monotonic() - resolved})
        except OSError as err:
            results.append({"name": name, "ok": False, "error": str(err),
                            "seconds": time.monotonic() - started})
    return {"results": results, "retransmitted": _retransmitted_segments() - before}


def query(name: str, rdtype: str) -> dict:
    import dns.message
    import dns.query
    import dns.rcode
    import dns.resolver

    server = dns.resolver.Resolver().nameservers[0]   # from this namespace's resolv.conf
    answer = dns.query.udp(dns.message.make_query(name, rdtype), server, timeout=5)
    return {"rcode": dns.rcode.to_text(answer.rcode()),
            "records": [rrset.to_text() for rrset in answer.answer]}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    connect = sub.add_parser("resolve-connect")
    connect.add_argument("port", type=int)
    connect.add_argument("names", nargs="+")
    ask = sub.add_parser("query")
    ask.add_argument("name")
    ask.add_argument("rdtype", nargs="?", default="A")
    args = parser.parse_args()
    if args.what == "resolve-connect":
        print(json.dumps(resolve_connect(args.names, args.port)))
    else:
        print(json.dumps(query(args.name, args.rdtype)))


if __name__ == "__main__":
    main()
