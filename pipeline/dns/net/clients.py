"""Where a query came from and how its answer goes back: a UDP address, a TCP connection.

Every client has send(wire, query) for its answer and dropped() for a query that gets none
(it was malformed). A TCP connection takes length-prefixed queries and answers them in any
order, at most MAX_TCP_PIPELINE at once; only whole queries count as activity, so bytes
trickling in never keep a slot open past the idle timeout.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol
from collections.abc import Callable

from ...histogram import Histogram
from ...reactor import READ, WRITE, Clock, Reactor, Timer
from .. import packets
from ..packets import Query

MAX_MESSAGE = 65_535
MAX_TCP_PIPELINE = 16     # queries one TCP client may have in flight


class Client(Protocol):
    def send(self, wire: bytes, query: Query) -> None: ...
    def dropped(self) -> None: ...


class Counters(Protocol):
    def add(self, name: str, n: int = 1) -> None: ...


class UdpClient:
    """A UDP query's source; its answer leaves through the socket it arrived on."""

    __slots__ = ("sock", "address", "counters")

    def __init__(self, sock: socket.socket, address: tuple[Any, ...],
                 counters: Counters) -> None:
        self.sock, self.address, self.counters = sock, address, counters

    def send(self, wire: bytes, query: Query) -> None:
        answer = packets.fit_for_udp(wire, query)
        if answer is not wire:
            self.counters.add("truncated_replies")
        try:
            self.sock.sendto(answer, self.address)
        except OSError:
            self.counters.add("replies_dropped")  # a full send buffer: the client retries

    def dropped(self) -> None:
        """Nothing to keep track of."""


class Timed:
    """One query's client, timing the query from its arrival to its answer (waited: the
    seconds it spent in the socket before it was read)."""

    __slots__ = ("client", "started", "latency", "clock")

    def __init__(self, client: Client, latency: Histogram, clock: Clock,
                 waited: float = 0.0) -> None:
        self.client, self.latency, self.clock = client, latency, clock
        self.started = clock() - waited

    def send(self, wire: bytes, query: Query) -> None:
        self.latency.observe(self.clock() - self.started)
        self.client.send(wire, query)

    def dropped(self) -> None:
        self.client.dropped()


class TcpClient:
    """One client TCP connection, registered with the reactor while it has something to do.
    on_query(frame, client) takes each whole query; on_close(client) hears of its end."""

    def __init__(self, reactor: Reactor, sock: socket.socket, address: str, idle_s: float,
                 counters: Counters, on_query: Callable[[bytes, TcpClient], None],
                 on_close: Callable[[TcpClient], None]) -> None:
        self.reactor, self.sock, self.address, self.idle_s = reactor, sock, address, idle_s
        self.counters, self.on_query, self.on_close = counters, on_query, on_close
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.idle_since: float | None = reactor.clock()  # None while a query is being served
        self.in_flight = 0
        self.eof = self.closed = self.taking = False
        self.idle: Timer | None = None
        self.interest = READ
        sock.setblocking(False)
        reactor.register(sock, self.interest, self.on_event)
        self._arm_idle()

    def on_event(self, mask: int) -> None:
        if mask & READ:
            self._read()
        if mask & WRITE and not self.closed:
            self._flush()

    def _read(self) -> None:
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.eof = True
            self._close_when_done()
            return
        self.inbuf += data
        self._take_queries()

    def _take_queries(self) -> None:
        if self.taking:
            return  # an answer sent from inside the loop below: the loop goes on by itself
        self.taking = True
        try:
            while len(self.inbuf) >= 2 and self.in_flight < MAX_TCP_PIPELINE and not self.closed:
                length = int.from_bytes(self.inbuf[:2], "big")
                if length > packets.MAX_QUERY_BYTES:
                    self.counters.add("malformed")
                    self.close()
                    return
                if len(self.inbuf) < 2 + length:
                    break
                frame = bytes(self.inbuf[2:2 + length])
                del self.inbuf[:2 + length]
                self.in_flight += 1
                self.idle_since = None
                self._arm_idle()
                self.on_query(frame, self)
        finally:
            self.taking = False
        if not self.closed:
            self._update_interest()

    def send(self, wire: bytes, query: Query) -> None:
        if self.closed:
            return
        self.in_flight -= 1
        self.outbuf += len(wire).to_bytes(2, "big") + wire
        self._flush()
        if not self.closed:
            self._take_queries()

    def dropped(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and not self.outbuf:
            self.idle_since = self.reactor.clock()
        self._close_when_done()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.outbuf)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return
        del self.outbuf[:sent]
        if not self.in_flight and not self.outbuf and self.idle_since is None:
            self.idle_since = self.reactor.clock()
        self._close_when_done()
        if not self.closed:
            self._update_interest()

    def _update_interest(self) -> None:
        events = WRITE if self.outbuf else 0
        if self.in_flight < MAX_TCP_PIPELINE and not self.eof:
            events |= READ  # a client at its pipeline limit waits unread
        if events == self.interest:
            return
        if not events:
            self.reactor.unregister(self.sock)
        elif not self.interest:
            self.reactor.register(self.sock, events, self.on_event)
        else:
            self.reactor.modify(self.sock, events, self.on_event)
        self.interest = events

    def _close_when_done(self) -> None:
        if self.eof and not self.in_flight and not self.outbuf:
            self.close()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = self.reactor.after(self.idle_s, self._on_idle)

    def _on_idle(self) -> None:
        if self.in_flight:
            self._arm_idle()
        else:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.idle is not None:
            self.idle.cancel()
        if self.interest:
            self.reactor.unregister(self.sock)
        self.sock.close()
        self.on_close(self)
