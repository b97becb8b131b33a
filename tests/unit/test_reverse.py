"""Reverse lookups are forward-confirmed: a PTR name counts only if it resolves back."""

import select
import socket
import threading
import time
import types

import dns.message
import dns.rcode
import dns.rrset

from pipeline.names.reverse import ERROR, NAMED, NO_NAME, UNCONFIRMED, ReverseResolver
from tests.support.tools.ptrserver import PtrServer
from tests.support.wait import wait_for


def lookups(server, ips):
    resolver = ReverseResolver("127.0.0.1", port=server.port, timeout=2)
    resolver.start()
    try:
        resolver.submit(ips)
        done = {}
        while len(done) < len(ips):
            assert select.select([resolver.fd], [], [], 5)[0], "lookups never finished"
            done.update({lookup.ip: lookup for lookup in resolver.finished()})
        return done
    finally:
        resolver.close()


def test_named_unconfirmed_and_unnamed_addresses():
    names = {"192.0.2.10": "web.allowed.example.", "2001:db8::10": "web6.allowed.example."}
    spoofed = {"192.0.2.66": "web.allowed.example."}
    with PtrServer(names, spoofed=spoofed) as server:
        done = lookups(server, ["192.0.2.10", "2001:db8::10", "192.0.2.66", "192.0.2.99"])
    assert (done["192.0.2.10"].outcome, done["192.0.2.10"].answer) == (
        NAMED, "web.allowed.example.")
    assert done["2001:db8::10"].outcome == NAMED
    assert (done["192.0.2.66"].outcome, done["192.0.2.66"].answer) == (
        UNCONFIRMED, "web.allowed.example.")
    assert done["192.0.2.99"].outcome == NO_NAME


class ForgingServer:
    """Answers each question with forgeries first, each claiming a name (which would start a
    forward question), then the real answer, NXDOMAIN: another id, another question, the
    query itself sent back, and the right answer from another port."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        while True:
            try:
                data, client = self.sock.recvfrom(512)
            except OSError:
                return
            query = dns.message.from_wire(data)
            named = dns.message.make_response(query)
            named.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "PTR",
                                                    "web.allowed.example."))
            wrong_id = dns.message.make_response(query)
            wrong_id.id ^= 1
            wrong_id.answer = named.answer
            # As long as the question asked: only its name tells them apart.
            elsewhere = dns.message.make_query("11.2.0.192.in-addr.arpa.", "PTR")
            elsewhere.id = query.id
            other_question = dns.message.make_response(elsewhere)
            other_question.answer.append(dns.rrset.from_text(
                "11.2.0.192.in-addr.arpa.", 300, "IN", "PTR", "web.allowed.example."))
            nxdomain = dns.message.make_response(query)
            nxdomain.set_rcode(dns.rcode.NXDOMAIN)
            for forged in (wrong_id.to_wire(), other_question.to_wire(), data):
                self.sock.sendto(forged, client)
            other.sendto(named.to_wire(), client)
            time.sleep(0.05)
            self.sock.sendto(nxdomain.to_wire(), client)

    def close(self):
        self.sock.close()


def test_datagrams_that_do_not_answer_the_question_asked_are_ignored():
    server = ForgingServer()
    try:
        done = lookups(server, ["192.0.2.10"])
    finally:
        server.close()
    assert done["192.0.2.10"].outcome == NO_NAME


def test_a_nameserver_that_refuses_the_question_is_an_error_at_once():
    unused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()  # nothing listens there now: the kernel answers port unreachable
    done = lookups(types.SimpleNamespace(port=port), ["192.0.2.10"])
    assert done["192.0.2.10"].outcome == ERROR


def test_questions_leave_from_sockets_carrying_the_mark():
    with PtrServer({}, delay=1.0) as server:
        resolver = ReverseResolver("127.0.0.1", port=server.port, timeout=2, mark=0x5eed)
        resolver.start()
        try:
            resolver.submit(["192.0.2.10", "192.0.2.11"])

            def in_flight():
                """The questions' sockets once both are registered (the server may hear a
                question before its thread has registered the socket it left from)."""
                try:
                    keys = list(resolver._selector.get_map().values())
                except RuntimeError:  # registered into while read: look again
                    return None
                sockets = [key.fileobj for key in keys if isinstance(key.fileobj, socket.socket)]
                return sockets if len(sockets) == 2 else None

            sockets = wait_for(in_flight, "both questions in flight")
            assert len(sockets) == 2
            assert {s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) for s in sockets} == {0x5eed}
        finally:
            resolver.close()


def test_a_question_that_cannot_be_sent_is_an_error_and_frees_its_slot():
    """The broadcast address refuses a socket without SO_BROADCAST (EACCES): nothing leaves.
    A send that failed once left its socket registered nowhere, and closing it killed the
    lookups thread."""
    resolver = ReverseResolver("255.255.255.255", port=53, timeout=2, concurrency=4)
    resolver.start()
    try:
        ips = [f"192.0.2.{i}" for i in range(1, 201)]
        resolver.submit(ips)
        done = {}
        while len(done) < len(ips):
            assert select.select([resolver.fd], [], [], 5)[0], "lookups never finished"
            done.update({lookup.ip: lookup for lookup in resolver.finished()})
        assert {lookup.outcome for lookup in done.values()} == {ERROR}
        assert resolver.worker.errors == 0 and resolver.worker.state() == "alive"
    finally:
        resolver.close()
