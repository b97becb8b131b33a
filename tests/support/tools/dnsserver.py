"""A small authoritative DNS server the tests start as the proxy's upstream.

In a test:  `server = AuthoritativeServer(ZONE).start()` ... `server.close()`; `server.port`,
            `server.asked[(name, "A")]` counts the questions it received.
In a namespace: `python -m tests.support.tools.dnsserver 10.201.0.2:53 zone.json [LOG]` prints
"ready"; with LOG, each question it receives is appended there as a line "name type".

A zone is a dict: name (lowercase, no trailing dot) -> entry with any of
  "A": [...], "AAAA": [...]  addresses            "ttl": seconds (default 60)
  "CNAME": "target"          followed inside the zone, every hop in the answer
  "stop": true               a CNAME answer ends at this name's CNAME, as an authority for
                             this zone alone would answer (the client asks for the target)
  "truncate": true           over UDP: TC set and no records; over TCP: the full answer
  "slow": seconds            the answer leaves this much later
  "lose": n                  the first n UDP questions for the name get no answer at all
  "forge": true              first three answers that must be discarded: a wrong id, another
                             question, and the right answer from another port; then the real one
Names not in the zone get NXDOMAIN.
"""

from __future__ import annotations

import collections
import heapq
import json
import selectors
import socket
import sys
import threading
import time

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

LOOP_S = 0.05


class AuthoritativeServer:
    def __init__(self, zone: dict, host: str = "127.0.0.1", port: int = 0,
                 log: str = "") -> None:
        self.zone = zone
        self.log = open(log, "a", buffering=1) if log else None
        self.asked: collections.Counter = collections.Counter()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.udp, self.tcp = self._bind_both(family, host, port)
        self.port = self.udp.getsockname()[1]
        self.tcp.listen(64)
        self.spoofer = socket.socket(family, socket.SOCK_DGRAM)  # "forge": another port
        self.spoofer.bind((host, 0))
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.udp, selectors.EVENT_READ, self._on_udp)
        self.selector.register(self.tcp, selectors.EVENT_READ, self._on_accept)
        self.later: list[tuple[float, int, object]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, name="dns-upstream", daemon=True)

    # ------------------------------------------------------------- running

    def start(self) -> AuthoritativeServer:
        self.thread.start()
        return self

    def serve(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(LOOP_S):
                key.data(key.fileobj)
            while self.later and self.later[0][0] <= time.monotonic():
                heapq.heappop(self.later)[2]()

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(5)
        for sock in [key.fileobj for key in self.selector.get_map().values()]:
            sock.close()
        self.selector.close()
        self.spoofer.close()

    def _at(self, delay: float, action) -> None:
        heapq.heappush(self.later, (time.monotonic() + delay, id(action), action))

    # ------------------------------------------------------------- transports

    @staticmethod
    def _bind_both(family: int, host: str, port: int) -> tuple[socket.socket, socket.socket]:
        """A UDP and a TCP socket on one port. With port 0 the kernel picks the UDP port,
        which a TCP connection of another test may hold: then another port is tried."""
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((host, port))
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((host, udp.getsockname()[1]))
                return udp, tcp
            except OSError:
                udp.close()
                tcp.close()
                if port:
                    raise
        raise OSError(f"no port free for both UDP and TCP on {host}")

    def _on_udp(self, sock: socket.socket) -> None:
        data, client = sock.recvfrom(65535)
        try:
            query = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - a test upstream ignores what it cannot read
            return
        entry, answer = self._answer(query)
        if entry.get("lose", 0) >= self.asked[self._key(query)]:
            return
        if entry.get("truncate"):
            answer = dns.message.make_response(query)
            answer.flags |= dns.flags.TC
        sends = [(sock, answer.to_wire())]
        if entry.get("forge"):
            sends = self._forgeries(query, answer) + sends
        self._at(entry.get("slow", 0), lambda: [s.sendto(w, client) for s, w in sends])

    def _forgeries(self, query: dns.message.Message, answer: dns.message.Message) -> list:
        wrong_id = dns.message.from_wire(answer.to_wire())
        wrong_id.id = (query.id + 1) % 65536
        other = dns.message.make_query("other.example", "A")
        other.id, other.flags = query.id, other.flags | dns.flags.QR
        return [(self.udp, wrong_id.to_wire()), (self.udp, other.to_wire()),
                (self.spoofer, answer.to_wire())]

    def _on_accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.setblocking(True)
        conn.settimeout(2)
        threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    query = dns.message.from_wire(_read_frame(conn))
                    entry, answer = self._answer(query)
                    time.sleep(entry.get("slow", 0))
                    wire = answer.to_wire()
                    conn.sendall(len(wire).to_bytes(2, "big") + wire)
            except (OSError, EOFError, dns.exception.DNSException):
                return

    # ------------------------------------------------------------- answers

    @staticmethod
    def _key(query: dns.message.Message) -> tuple[str, str]:
        question = query.question[0]
        return (question.name.to_text(omit_final_dot=True).lower(),
                dns.rdatatype.to_text(question.rdtype))

    def _answer(self, query: dns.message.Message) -> tuple[dict, dns.message.Message]:
        answer = dns.message.make_response(query)
        answer.flags |= dns.flags.AA
        name, rdtype = self._key(query)
        self.asked[(name, rdtype)] += 1
        if self.log:
            self.log.write(f"{name} {rdtype}\n")
        entry = self.zone.get(name)
        if entry is None:
            answer.set_rcode(dns.rcode.NXDOMAIN)
            return {}, answer
        owner, seen = name, set()
        while "CNAME" in self.zone.get(owner, {}) and owner not in seen:
            seen.add(owner)
            hop = self.zone[owner]
            answer.answer.append(_rrset(owner, hop, "CNAME", [hop["CNAME"] + "."]))
            if hop.get("stop"):
                return entry, answer
            owner = hop["CNAME"]
        final = self.zone.get(owner, {})
        if final.get(rdtype):
            answer.answer.append(_rrset(owner, final, rdtype, final[rdtype]))
        return entry, answer


def _rrset(owner: str, entry: dict, rdtype: str, values: list[str]) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(owner + ".", entry.get("ttl", 60), dns.rdataclass.IN, rdtype,
                                    values)


def _read_frame(conn: socket.socket) -> bytes:
    length = int.from_bytes(_read_exactly(conn, 2), "big")
    return _read_exactly(conn, length)


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def main() -> None:
    address, zone_file = sys.argv[1], sys.argv[2]
    host, _, port = address.rpartition(":")
    server = AuthoritativeServer(json.loads(open(zone_file).read()), host.strip("[]"), int(port),
                                 sys.argv[3] if len(sys.argv) > 3 else "")
    print("ready", flush=True)
    server.serve()


if __name__ == "__main__":
    main()
