"""Questions to the upstream resolver: UDP first, TCP again when the answer is truncated.

A UDP question with no answer is sent again after RESEND_FIRST_S, then after twice as long
and so on until the deadline (upstream_resends), as stub resolvers do: one lost datagram
costs a second, not a SERVFAIL. The resend keeps the socket and the id, so a late answer
to the first send still counts.

Each exchange has its own socket and a random id (the client's may be guessable); an answer
whose source, id or question does not match is discarded and counted (mismatched_answers).
done(wire) is called once, with the checked answer, or with None after an error or the
deadline. Each answer's round trip (the question's first send to its answer, resends and a
TCP retry included) goes to the round_trip histogram: the upstream's part of a fresh answer.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

from ...histogram import Histogram
from ...reactor import READ, WRITE, Reactor
from .. import packets
from ..endpoints import Endpoint
from .clients import MAX_MESSAGE, Counters

UDP_BURST = 64   # datagrams read from one socket before looking at the others
RESEND_FIRST_S = 1.0  # a UDP question unanswered this long is sent again (then 2 s, 4 s...)

Done = Callable[[bytes | None], None]


class Upstream:
    """The upstream and the exchanges in flight with it. mark: the SO_MARK the redirect
    hooks let through (0 for none), so the proxy's own queries never come back to it."""

    def __init__(self, reactor: Reactor, endpoint: Endpoint, timeout_s: float, mark: int,
                 counters: Counters, round_trip: Histogram) -> None:
        self.reactor, self.endpoint, self.timeout_s = reactor, endpoint, timeout_s
        self.mark, self.counters, self.round_trip = mark, counters, round_trip
        self.exchanges: set[Exchange] = set()

    def ask(self, question: bytes, wire: bytes, done: Done) -> None:
        Exchange(self, question, wire, done)

    def in_flight(self) -> int:
        return len(self.exchanges)

    def close(self) -> None:
        """At teardown: every exchange ends without an answer (and without a callback)."""
        for exchange in list(self.exchanges):
            exchange.abandon()


class Exchange:
    """One question to the upstream."""

    def __init__(self, upstream: Upstream, question: bytes, wire: bytes, done: Done) -> None:
        self.upstream, self.reactor, self.counters = upstream, upstream.reactor, upstream.counters
        self.question, self.done = question, done
        self.id = int.from_bytes(os.urandom(2), "big")
        self.wire = packets.with_id(wire, self.id)
        self.sock: socket.socket | None = None
        self.tcp_in, self.tcp_out = bytearray(), b""
        self.finished = False
        self.asked = self.reactor.clock()
        self.deadline = self.reactor.after(upstream.timeout_s, self._timed_out)
        self.resend_in = RESEND_FIRST_S
        self.resend = self.reactor.after(self.resend_in, self._resend_udp)
        upstream.exchanges.add(self)
        self._send_udp()

    @property
    def _live(self) -> socket.socket:
        assert self.sock is not None, "a callback of a finished exchange"
        return self.sock

    def _open(self, kind: int) -> socket.socket:
        family = socket.AF_INET6 if self.upstream.endpoint.version == 6 else socket.AF_INET
        sock = socket.socket(family, kind)
        if self.upstream.mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.upstream.mark)
        sock.setblocking(False)
        self.sock = sock
        return sock

    def _send_udp(self) -> None:
        sock = self._open(socket.SOCK_DGRAM)
        try:
            sock.sendto(self.wire, self.upstream.endpoint.sockaddr)
        except OSError:
            self._finish(None, "upstream_errors")
            return
        self.reactor.register(sock, READ, self._on_udp)

    def _resend_udp(self) -> None:
        try:
            self._live.sendto(self.wire, self.upstream.endpoint.sockaddr)
        except OSError:
            pass  # the deadline still ends it; a later resend may get through
        self.counters.add("upstream_resends")
        self.resend_in *= 2
        self.resend = self.reactor.after(self.resend_in, self._resend_udp)

    def _on_udp(self, mask: int) -> None:
        for _ in range(UDP_BURST):
            try:
                data, source = self._live.recvfrom(MAX_MESSAGE)
            except OSError:
                return
            if source[:2] != self.upstream.endpoint.sockaddr or not packets.answers_question(
                    data, self.id, self.question):
                self.counters.add("mismatched_answers")
                continue
            if packets.is_truncated(data):
                self.counters.add("tcp_retries")
                self._switch_to_tcp()
            else:
                self._finish(data)
            return

    def _switch_to_tcp(self) -> None:
        self.resend.cancel()
        self._close_socket()
        sock = self._open(socket.SOCK_STREAM)
        err = sock.connect_ex(self.upstream.endpoint.sockaddr)
        if err not in (0, errno.EINPROGRESS):
            self._finish(None, "upstream_errors")
            return
        self.tcp_out = len(self.wire).to_bytes(2, "big") + self.wire
        self.reactor.register(sock, WRITE, self._on_tcp)

    def _on_tcp(self, mask: int) -> None:
        try:
            if mask & WRITE:
                self._tcp_write()
            else:
                self._tcp_read()
        except OSError:
            self._finish(None, "upstream_errors")

    def _tcp_write(self) -> None:
        err = self._live.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        sent = self._live.send(self.tcp_out)
        self.tcp_out = self.tcp_out[sent:]
        if not self.tcp_out:
            self.reactor.modify(self._live, READ, self._on_tcp)

    def _tcp_read(self) -> None:
        data = self._live.recv(MAX_MESSAGE + 2 - len(self.tcp_in))
        if not data:
            raise OSError(errno.ECONNRESET, "the upstream closed the connection")
        self.tcp_in += data
        if len(self.tcp_in) < 2 or len(self.tcp_in) < 2 + int.from_bytes(self.tcp_in[:2], "big"):
            return
        answer = bytes(self.tcp_in[2:2 + int.from_bytes(self.tcp_in[:2], "big")])
        if packets.answers_question(answer, self.id, self.question):
            self._finish(answer)
        else:
            self.counters.add("mismatched_answers")  # one answer per connection: give up
            self._finish(None, "upstream_errors")

    def _timed_out(self) -> None:
        self._finish(None, "upstream_timeouts")

    def _finish(self, wire: bytes | None, failure: str = "") -> None:
        if self.finished:
            return
        self.abandon()
        if failure:
            self.counters.add(failure)
        if wire is not None:
            self.upstream.round_trip.observe(self.reactor.clock() - self.asked)
        self.done(wire)

    def _close_socket(self) -> None:
        if self.sock is None:
            return
        try:
            self.reactor.unregister(self.sock)
        except KeyError:
            pass  # never registered: the send failed
        self.sock.close()
        self.sock = None

    def abandon(self) -> None:
        self.finished = True
        self.deadline.cancel()
        self.resend.cancel()
        self._close_socket()
        self.upstream.exchanges.discard(self)
