"""allow_requests to the policy stage's REP inbox (policy-allow) over a DEALER.

Many requests can be in flight; replies are matched by request_id, and a lost reply only
times out its own query (after wait_s), so there is no REQ state machine to reset. An empty
reply frame is the REP inbox rejecting a request as malformed: REP answers in order, so it
is the oldest still waiting.

Each request is preceded by lend(): the thread that answers is lent real-time priority for
it (pipeline/lending.py), so that under a flood it does not wait for a CPU behind bulk work;
take_back() returns it once no request waits, before the answer is released.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from collections.abc import Callable
from typing import cast

import zmq

from ... import messages
from ...errors import MessageError
from ...events import AllowReply, AllowRequest
from ...histogram import Histogram
from ...reactor import READ, Reactor, Timer
from ..answers import AnswerFacts
from ..enforce import AllowAsk
from .clients import Counters

Done = Callable[[bool], None]


class AllowClient:
    """done(ok) once per request: True when the policy stage opened the addresses."""

    def __init__(self, sock: zmq.Socket[bytes], reactor: Reactor, wait_s: float,
                 clock_ns: Callable[[], int], counters: Counters, round_trip: Histogram,
                 log: logging.Logger, lend: Callable[[], None] = lambda: None,
                 take_back: Callable[[], None] = lambda: None) -> None:
        self.sock, self.reactor, self.wait_s, self.clock_ns = sock, reactor, wait_s, clock_ns
        self.lend, self.take_back = lend, take_back
        self.counters, self.round_trip, self.log = counters, round_trip, log
        self.complained = False
        # ZeroMQ's descriptor only says "look at EVENTS": every look drains until empty.
        reactor.register(sock.getsockopt(zmq.FD), READ, lambda mask: self.drain())
        self.pending: collections.OrderedDict[str, tuple[Done, Timer]] = (
            collections.OrderedDict())
        self.prefix = os.urandom(4).hex()
        self.count = itertools.count(1)

    def request(self, ask: AllowAsk, facts: AnswerFacts, done: Done) -> None:
        request_id = f"{self.prefix}-{next(self.count):x}"
        record = AllowRequest(request_id, ask.name, list(facts.ips), facts.ttl, list(ask.chain),
                              self.clock_ns())
        self.counters.add("allow_requests")
        self.lend()  # before the request can arrive, so it is answered ahead of the flood
        try:
            self.sock.send_multipart([b"", messages.encode([record])], zmq.NOBLOCK)
        except zmq.Again:
            self._settled()
            self._failed(done, "the policy stage's queue is full")
            return
        timer = self.reactor.after(self.wait_s, lambda: self._expire(request_id))
        self.pending[request_id] = (done, timer)
        self.drain()  # a send can swallow the descriptor's wake-up

    def drain(self) -> None:
        while cast(int, self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
            self._on_reply(frames[-1])

    def _on_reply(self, frame: bytes) -> None:
        if not frame:
            if self.pending:
                done, timer = self.pending.popitem(last=False)[1]
                timer.cancel()
                self._settled()
                self._failed(done, "the policy stage rejected a request as malformed")
            return
        try:
            kind, records, bad = messages.decode(frame)
            if kind != AllowReply.KIND or len(records) != 1 or bad:
                raise MessageError(f"expected one allow_replies record, got {kind}")
        except MessageError as err:
            self.counters.add("malformed_replies")
            if not self.complained:
                self.complained = True
                self.log.warning("unusable reply from the policy stage: %s (counted, "
                                 "logged once)", err)
            return
        reply = records[0]
        waiting = self.pending.pop(reply.request_id, None)
        if waiting is None:
            self.counters.add("late_allow_replies")  # its query already gave up
            return
        done, timer = waiting
        timer.cancel()
        self._settled()  # before the answer goes out: its client must not wait behind policy
        # The expiry timer was set wait_s after the request left.
        self.round_trip.observe(self.reactor.clock() - (timer.when - self.wait_s))
        if reply.ok:
            done(True)
        else:
            self._failed(done, reply.error)

    def _expire(self, request_id: str) -> None:
        waiting = self.pending.pop(request_id, None)
        if waiting is not None:
            self._settled()
            self._failed(waiting[0], f"no reply within {self.wait_s:g} s")

    def _settled(self) -> None:
        """A request left the pending ones: with none left, the lend is taken back."""
        if not self.pending:
            self.take_back()

    def _failed(self, done: Done, why: str) -> None:
        self.counters.add("allow_failures")
        self.log.debug("allow request failed: %s", why)
        done(False)
