"""A DNS server for tests that answers PTR queries from a table, each after a delay.

Addresses in the table get their name (NOERROR), and the name's A/AAAA question gets the
address back (forward-confirmed), unless the address is in `spoofed`: a PTR record someone
set on an address they control, with no forward record to match. Any other question gets
NXDOMAIN. The delay is per answer, not per server: a thousand slow questions are all
answered about `delay` seconds after each arrived, as a slow upstream would.

In a test:       with PtrServer({"10.1.0.7": "web.example."}, delay=2.0) as server: server.port
In a namespace:  python -m tests.support.tools.ptrserver 10.201.0.2 53 --ptr 10.202.0.3=web.example.
                 [--spoof 10.202.0.4=web.example.]
                 (prints "ready" once listening)
"""

from __future__ import annotations

import argparse
import asyncio
import threading

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.reversename


class PtrServer:
    def __init__(self, names: dict[str, str], delay: float = 0.0, host: str = "127.0.0.1",
                 port: int = 0, spoofed: dict[str, str] | None = None) -> None:
        self.names, self.delay = {**names, **(spoofed or {})}, delay
        self.forward: dict[str, list[str]] = {}
        for address, name in names.items():
            self.forward.setdefault(name.lower().rstrip("."), []).append(address)
        self.host, self.port = host, port
        self.questions: list[str] = []  # every PTR question asked, as its address
        self.loop = asyncio.new_event_loop()
        self.thread: threading.Thread | None = None

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        if question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            return self._forward(response, question)
        name = None
        if question.rdtype == dns.rdatatype.PTR:
            address = dns.reversename.to_address(question.name)
            self.questions.append(address)
            name = self.names.get(address)
        if name is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            response.answer.append(dns.rrset.from_text(
                question.name, 300, dns.rdataclass.IN, dns.rdatatype.PTR, name))
        return response

    def _forward(self, response: dns.message.Message, question) -> dns.message.Message:
        family = ":" if question.rdtype == dns.rdatatype.AAAA else "."
        addresses = [a for a in self.forward.get(question.name.to_text().lower().rstrip("."), [])
                     if family in a]
        if addresses:
            response.answer.append(dns.rrset.from_text_list(
                question.name, 300, dns.rdataclass.IN, question.rdtype, addresses))
        return response

    async def listen(self) -> None:
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, self.port))
        self.port = transport.get_extra_info("sockname")[1]

    def __enter__(self) -> PtrServer:
        self.loop.run_until_complete(self.listen())
        self.thread = threading.Thread(target=self.loop.run_forever, name="ptr-server",
                                       daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: PtrServer) -> None:
        self.server = server

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - garbage from a test is ignored, as a server would
            return
        if not query.question:
            return
        reply = self.server.answer(query).to_wire()
        self.server.loop.call_later(self.server.delay, self.transport.sendto, reply, addr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--ptr", action="append", default=[], help="ADDRESS=NAME")
    parser.add_argument("--spoof", action="append", default=[],
                        help="ADDRESS=NAME without a matching forward record")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    server = PtrServer(dict(entry.split("=", 1) for entry in args.ptr), args.delay, args.host,
                       args.port, dict(entry.split("=", 1) for entry in args.spoof))
    server.loop.run_until_complete(server.listen())
    print("ready", flush=True)
    server.loop.run_forever()


if __name__ == "__main__":
    main()
