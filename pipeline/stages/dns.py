"""dns: the DNS proxy that opens the firewall just in time, filters queries, follows CNAMEs.

Serves:   DNS over UDP and TCP on each SLUICE_DNS_LISTEN address (default 127.0.0.1:53), and
          only there: a wildcard address is refused at start, so it is never an open resolver.
Forwards: to SLUICE_DNS_UPSTREAM (default: the first /etc/resolv.conf nameserver that is not
          this proxy) over UDP, again over TCP when the answer comes back truncated; no
          answer within SLUICE_DNS_TIMEOUT -> SERVFAIL. NOERROR answers with records are
          cached (reference §5.3). Upstream answers whose source, id or question do not
          match what was asked are discarded and counted.
Filters:  with SLUICE_DNS_FILTER, questions the policy does not let through (reference §5.2,
          canonical reverse names always pass) get a `dns_blocked` audit record and, in
          enforce mode, REFUSED without any upstream traffic; audit mode records and forwards.
Opens:    before any NOERROR answer with addresses (cached or fresh) leaves, the addresses go
          to the policy stage as an `allow_requests` record on its REP inbox
          policy-allow.sock; the answer is released only when the `allow_replies` record says
          ok. Not ok, a rejected request or no reply within ALLOW_WAIT_S: enforce mode answers
          SERVFAIL (an address the firewall would drop is worse than no address), audit mode
          answers normally. Nothing is ever released on a timeout in enforce mode. An ok is
          remembered under the maps' generation (map_config.generation of the maps pinned in
          SLUICE_BPF_DIR, one lookup per answer): a later answer for the same name whose every
          address was confirmed at the current generation is already open and leaves at once
          (pipeline/dns/confirmed.py). Without readable pinned maps every answer asks.
          CNAME targets of allowed names are learned, derive their origin's allow, and are
          resolved ahead of the client when an answer stops at a CNAME (reference §5.4).
Produces: `dns_mappings` (name, addresses, TTL, CNAME chain) to enrich for every answer with
          addresses (but a name let through only by the search-domain bypass);
          `audit_records` (dns_blocked) to persist.
Binds:    the DNS listeners (no ZeroMQ inbox). Connects: enrich, persist, policy-allow.
Cache hits: a query of the usual shape (one question, standard query, at most an EDNS OPT)
          finds its cached answer by the question's bytes, is judged by the filter's memory
          of the policy (pipeline/dns/queryfilter.py) and is answered from the cached wire
          form with its id; anything else, and any name the filter might refuse, takes the
          full parse.
Bad input: malformed, truncated or oversized queries are counted (`malformed`) and dropped;
          each query holds bounded memory (MAX_QUERY_BYTES in, one answer out, at most
          MAX_IN_FLIGHT queries and MAX_TCP_CLIENTS connections at once).
TCP slots: a connection without a whole query for TCP_IDLE_S is closed; one client address
          holds at most MAX_TCP_PER_ADDRESS connections, and a newcomer beyond that share or
          beyond MAX_TCP_CLIENTS takes the slot of the longest-idle connection (its own
          address's first; tcp_idle_evicted), so idle connections never deny TCP DNS to
          others; only when every candidate is busy is it refused (tcp_clients_refused).
Reload:   SIGHUP, or a change of the policy file (pipeline/livepolicy.py): a valid policy
          replaces the old one, an invalid one is logged and the old one stays.
Start:    an address that cannot be bound stops the stage with one line naming the address
          and the process holding it.
Timing:   histograms answer_latency_seconds (a query's arrival to its answer) and
          allow_round_trip_seconds (an allow request to policy's reply) are written with the
          counters (<run_dir>/dns.counters.json); the export stage's /metrics serves them.

Concurrency: one thread, no locks. The stage's sockets (listeners, client TCP connections,
one UDP socket per upstream query, upstream TCP retries, and the ZeroMQ DEALER to policy) sit
in an epoll selector whose own descriptor the shared stage loop polls, so queries waiting on
the upstream or on the policy stage never hold up the others. A DEALER (not REQ) carries the
allow requests: many can be in flight, replies are matched by request_id, and a lost reply
only times out its own query, so there is no REQ state machine to reset. Timeouts are a heap
checked on every loop turn.

Example:  SLUICE_MODE=enforce SLUICE_DNS_UPSTREAM=1.1.1.1 sluice run dns
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import heapq
import itertools
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import dns.exception
import dns.message
import dns.rdatatype
import zmq

from .. import messages
from ..audit import AuditEvent, new_event_id, normalize
from ..dns import packets
from ..dns.answers import AnswerFacts, answer_facts
from ..dns.cache import ResponseCache
from ..dns.cnames import LearnedTargets
from ..dns.confirmed import ConfirmedOpen
from ..dns.endpoints import Endpoint, parse_listen, redirect_endpoints
from ..dns.enforce import AllowAsk, PreResolveMemory, plan_answer
from ..dns.holders import holder_inodes
from ..dns.packets import Malformed, Query
from ..dns.queryfilter import REFUSE, PolicyMemory, judge_query
from ..dns.tcpslots import Held, make_room
from ..errors import ExitCode, KernelError, MessageError, SettingsError, SluiceError
from ..events import AllowReply, AllowRequest, DnsMapping
from ..kernel import libbpf
from ..kernel.maps import PinnedMaps
from ..kernel.redirect import check_mark, ipv6_available
from ..kernel.structs import DNS_MARK, Config
from ..livepolicy import LivePolicy
from ..loop import BaseStage, StageIO, batched, run_stage
from ..policy.startup import HostFiles, proxy_upstream
from ..settings import Settings

ALLOW_WAIT_S = 2.0        # well inside a stub resolver's 5 s retry; the policy answers in ~1 ms
MAX_IN_FLIGHT = 2048      # queries waiting on the upstream or the policy at once
MAX_TCP_CLIENTS = 256
MAX_TCP_PER_ADDRESS = 64  # one client address's share of the TCP slots
MAX_TCP_PIPELINE = 16     # queries one TCP client may have in flight
TCP_IDLE_S = 3.0          # a connection without a query this long is closed (RFC 7766 6.2.3)
MAX_MESSAGE = 65_535
UDP_BURST = 64            # datagrams read from one socket before looking at the others
MAX_PRE_RESOLVING = 64
PIN_CHECK_S = 1.0           # how soon maps pinned anew (after a detach) are followed
PRE_RESOLVE_PAYLOAD = 1232  # EDNS size of our own queries (the DNS flag day's safe value)
IP_FREEBIND = 15            # bind before capture has put the address on lo


class ListenError(SluiceError):
    exit_code = ExitCode.DNS_LISTEN


# ------------------------------------------------------------------ timers


@dataclasses.dataclass(slots=True)
class Timer:
    when: float
    action: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """Deadlines on a heap; a cancelled timer stays until due and is skipped then."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Timer]] = []
        self.order = itertools.count()

    def after(self, delay: float, action: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, action)
        heapq.heappush(self.heap, (timer.when, next(self.order), timer))
        return timer

    def run_due(self, now: float) -> None:
        while self.heap and self.heap[0][0] <= now:
            timer = heapq.heappop(self.heap)[2]
            if not timer.cancelled:
                timer.action()


# ------------------------------------------------------------------ clients


class UdpClient:
    """Where a UDP query came from; its answer leaves through the socket it arrived on."""

    __slots__ = ("sock", "address", "counters")

    def __init__(self, sock: socket.socket, address, counters) -> None:
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
        """A query that gets no answer (it was malformed): nothing to keep track of."""


class Timed:
    """One query's client, timing the query from its arrival to its answer."""

    __slots__ = ("client", "started", "latency")

    def __init__(self, client, latency) -> None:
        self.client, self.latency, self.started = client, latency, time.monotonic()

    def send(self, wire: bytes, query: Query) -> None:
        self.latency.observe(time.monotonic() - self.started)
        self.client.send(wire, query)

    def dropped(self) -> None:
        self.client.dropped()


class TcpClient:
    """One client TCP connection: length-prefixed queries in, answers out, in any order.
    Only whole queries count as activity: bytes trickling in never keep a slot."""

    def __init__(self, stage: DnsStage, sock: socket.socket, address: str) -> None:
        self.stage, self.sock, self.address = stage, sock, address
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.idle_since: float | None = time.monotonic()  # None while a query is being served
        self.in_flight = 0
        self.eof = self.closed = self.taking = False
        self.idle: Timer | None = None
        self.interest = selectors.EVENT_READ
        sock.setblocking(False)
        stage.selector.register(sock, self.interest, self.on_event)
        self._arm_idle()

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._read()
        if mask & selectors.EVENT_WRITE and not self.closed:
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
                    self.stage.io.counters.add("malformed")
                    self.close()
                    return
                if len(self.inbuf) < 2 + length:
                    break
                frame = bytes(self.inbuf[2:2 + length])
                del self.inbuf[:2 + length]
                self.in_flight += 1
                self.idle_since = None
                self._arm_idle()
                self.stage.on_query(frame, self)
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
        """A query of this connection ends without an answer (it was malformed)."""
        self.in_flight -= 1
        if not self.in_flight and not self.outbuf:
            self.idle_since = time.monotonic()
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
            self.idle_since = time.monotonic()
        self._close_when_done()
        if not self.closed:
            self._update_interest()

    def _update_interest(self) -> None:
        events = selectors.EVENT_WRITE if self.outbuf else 0
        if self.in_flight < MAX_TCP_PIPELINE and not self.eof:
            events |= selectors.EVENT_READ  # a client at its pipeline limit waits unread
        if events == self.interest:
            return
        if not events:
            self.stage.selector.unregister(self.sock)
        elif not self.interest:
            self.stage.selector.register(self.sock, events, self.on_event)
        else:
            self.stage.selector.modify(self.sock, events, self.on_event)
        self.interest = events

    def _close_when_done(self) -> None:
        if self.eof and not self.in_flight and not self.outbuf:
            self.close()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = self.stage.timers.after(TCP_IDLE_S, self._on_idle)

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
            self.stage.selector.unregister(self.sock)
        self.sock.close()
        self.stage.tcp_clients.discard(self)


# ------------------------------------------------------------------ upstream


class UpstreamExchange:
    """One question to the upstream: UDP first, TCP when the answer is truncated; done(wire)
    once with the checked answer, or done(None) after an error or the deadline."""

    def __init__(self, stage: DnsStage, question: bytes, wire: bytes,
                 done: Callable[[bytes | None], None]) -> None:
        self.stage, self.question, self.done = stage, question, done
        self.id = int.from_bytes(os.urandom(2), "big")  # the client's id may be guessable
        self.wire = packets.with_id(wire, self.id)
        self.sock: socket.socket | None = None
        self.tcp_in = bytearray()
        self.finished = False
        self.deadline = stage.timers.after(stage.settings.dns_timeout, self._timed_out)
        stage.exchanges.add(self)
        self._send_udp()

    @property
    def counters(self):
        return self.stage.io.counters

    def _open(self, kind: int) -> socket.socket:
        family = socket.AF_INET6 if self.stage.upstream.version == 6 else socket.AF_INET
        sock = socket.socket(family, kind)
        if self.stage.mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.stage.mark)
        sock.setblocking(False)
        self.sock = sock
        return sock

    def _send_udp(self) -> None:
        sock = self._open(socket.SOCK_DGRAM)
        try:
            sock.sendto(self.wire, self.stage.upstream.sockaddr)
        except OSError:
            self._finish(None, "upstream_errors")
            return
        self.stage.selector.register(sock, selectors.EVENT_READ, self._on_udp)

    def _on_udp(self, mask: int) -> None:
        for _ in range(UDP_BURST):
            try:
                data, source = self.sock.recvfrom(MAX_MESSAGE)
            except OSError:
                return
            if source[:2] != self.stage.upstream.sockaddr or not packets.answers_question(
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
        self._close_socket()
        sock = self._open(socket.SOCK_STREAM)
        err = sock.connect_ex(self.stage.upstream.sockaddr)
        if err not in (0, errno.EINPROGRESS):
            self._finish(None, "upstream_errors")
            return
        self.tcp_out = len(self.wire).to_bytes(2, "big") + self.wire
        self.stage.selector.register(sock, selectors.EVENT_WRITE, self._on_tcp)

    def _on_tcp(self, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._tcp_write()
            else:
                self._tcp_read()
        except OSError:
            self._finish(None, "upstream_errors")

    def _tcp_write(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        sent = self.sock.send(self.tcp_out)
        self.tcp_out = self.tcp_out[sent:]
        if not self.tcp_out:
            self.stage.selector.modify(self.sock, selectors.EVENT_READ, self._on_tcp)

    def _tcp_read(self) -> None:
        data = self.sock.recv(MAX_MESSAGE + 2 - len(self.tcp_in))
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
        self.finished = True
        self.deadline.cancel()
        self._close_socket()
        self.stage.exchanges.discard(self)
        if failure:
            self.counters.add(failure)
        self.done(wire)

    def _close_socket(self) -> None:
        if self.sock is None:
            return
        try:
            self.stage.selector.unregister(self.sock)
        except KeyError:
            pass  # never registered: the send failed
        self.sock.close()
        self.sock = None

    def abandon(self) -> None:
        """At teardown: close without an answer."""
        self.finished = True
        self.deadline.cancel()
        self._close_socket()
        self.stage.exchanges.discard(self)


# ------------------------------------------------------------------ policy requests


class AllowClient:
    """allow_requests to the policy stage's REP inbox over a DEALER, many in flight."""

    def __init__(self, io: StageIO, selector: selectors.BaseSelector, timers: Timers,
                 clock: Callable[[], int]) -> None:
        self.io, self.timers, self.clock = io, timers, clock
        self.complained = False
        self.round_trip = io.histogram("allow_round_trip_seconds")
        self.sock = io.connect_requests()["allow_requests"]
        # ZeroMQ's descriptor only says "look at EVENTS": every look drains until empty.
        selector.register(self.sock.getsockopt(zmq.FD), selectors.EVENT_READ,
                          lambda mask: self.drain())
        self.pending: collections.OrderedDict[str, tuple[Callable[[bool], None], Timer]] = (
            collections.OrderedDict())
        self.prefix = os.urandom(4).hex()
        self.count = itertools.count(1)

    def request(self, ask: AllowAsk, facts: AnswerFacts, done: Callable[[bool], None]) -> None:
        request_id = f"{self.prefix}-{next(self.count):x}"
        record = AllowRequest(request_id, ask.name, list(facts.ips), facts.ttl, list(ask.chain),
                              self.clock())
        self.io.counters.add("allow_requests")
        try:
            self.sock.send_multipart([b"", messages.encode([record])], zmq.NOBLOCK)
        except zmq.Again:
            self._failed(done, "the policy stage's queue is full")
            return
        timer = self.timers.after(ALLOW_WAIT_S, lambda: self._expire(request_id))
        self.pending[request_id] = (done, timer)
        self.drain()  # a send can swallow the descriptor's wake-up

    def drain(self) -> None:
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
            self._on_reply(frames[-1])

    def _on_reply(self, frame: bytes) -> None:
        if not frame:
            # REP answers in order: an empty frame rejects the oldest request still waiting.
            if self.pending:
                done, timer = self.pending.popitem(last=False)[1]
                timer.cancel()
                self._failed(done, "the policy stage rejected a request as malformed")
            return
        try:
            kind, records, bad = messages.decode(frame)
            if kind != AllowReply.KIND or len(records) != 1 or bad:
                raise MessageError(f"expected one allow_replies record, got {kind}")
        except MessageError as err:
            self.io.counters.add("malformed_replies")
            if not self.complained:
                self.complained = True
                self.io.log.warning("unusable reply from the policy stage: %s (counted, "
                                    "logged once)", err)
            return
        reply = records[0]
        waiting = self.pending.pop(reply.request_id, None)
        if waiting is None:
            self.io.counters.add("late_allow_replies")  # its query already gave up
            return
        done, timer = waiting
        timer.cancel()
        # The expiry timer was set ALLOW_WAIT_S after the request left.
        self.round_trip.observe(time.monotonic() - (timer.when - ALLOW_WAIT_S))
        if reply.ok:
            done(True)
        else:
            self._failed(done, reply.error)

    def _expire(self, request_id: str) -> None:
        waiting = self.pending.pop(request_id, None)
        if waiting is not None:
            self._failed(waiting[0], f"no reply within {ALLOW_WAIT_S:g} s")

    def _failed(self, done: Callable[[bool], None], why: str) -> None:
        self.io.counters.add("allow_failures")
        self.io.log.debug("allow request failed: %s", why)
        done(False)


# ------------------------------------------------------------------ map generation


class PinnedGeneration:
    """map_config.generation of this instance's pinned maps, with the pin's inode, so that
    maps pinned anew never pass for the old ones even at an equal generation. None while
    there is no pin (capture not started, or detached), it cannot be opened, or the maps are
    not programmed yet (generation 0). The pin is looked at again every check_every s."""

    def __init__(self, bpf_dir: Path, check_every: float = PIN_CHECK_S) -> None:
        self.path = bpf_dir / "map_config"
        self.check_every = check_every
        self.maps: PinnedMaps | None = None
        self.inode = 0
        self.next_check = 0.0
        self.key, self.value = ctypes.c_uint32(0), Config()

    def read(self) -> tuple[int, int] | None:
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + self.check_every
            self._follow_pin()
        if self.maps is None or not libbpf.lookup(self.maps.fds["map_config"], self.key,
                                                  self.value):
            return None
        return (self.inode, self.value.generation) if self.value.generation else None

    def _follow_pin(self) -> None:
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            inode = 0
        if inode == self.inode:
            return
        self.close()
        try:
            self.maps = PinnedMaps(self.path.parent, ("map_config",)) if inode else None
            self.inode = inode
        except KernelError:
            pass  # gone again, or no libbpf: no generation, so every answer asks

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()
        self.maps, self.inode = None, 0


# ------------------------------------------------------------------ the stage


class DnsStage(BaseStage):
    name = "dns"

    def __init__(self, files: HostFiles | None = None,
                 clock: Callable[[], int] = time.time_ns,
                 generation: Callable[[], Hashable | None] | None = None) -> None:
        """generation: the maps' current generation, None when unknown; by default
        PinnedGeneration on SLUICE_BPF_DIR, opened at setup."""
        self.files = files or HostFiles()
        self.clock = clock
        self.generation = generation
        self.pinned: PinnedGeneration | None = None
        self.confirmed = ConfirmedOpen()
        self.names = PolicyMemory()
        self.cache = ResponseCache()
        self.learned = LearnedTargets()
        self.pre_resolved = PreResolveMemory()
        self.selector = selectors.DefaultSelector()
        self.timers = Timers()
        self.listeners: list[socket.socket] = []
        self.tcp_clients: set[TcpClient] = set()
        self.exchanges: set[UpstreamExchange] = set()
        self.mappings: list[DnsMapping] = []
        self.audits: list[AuditEvent] = []
        self.allow_in_flight = self.pre_resolving = 0

    # ------------------------------------------------------------- start and stop

    def setup(self, io: StageIO) -> None:
        self.io = io
        self.settings = settings = io.settings
        try:
            self.listen = parse_listen(settings.dns_listen)
        except ValueError as err:
            raise SettingsError(f"SLUICE_DNS_LISTEN={settings.dns_listen!r}: {err}") from None
        try:
            self.upstream = proxy_upstream(settings, self.files)
        except ValueError as err:
            raise SettingsError(f"SLUICE_DNS_UPSTREAM={settings.dns_upstream!r}: {err}") from None
        # Where the redirect sends queries (capture puts the addresses on lo; they may not be
        # there yet, hence IP_FREEBIND); the proxy's own upstream sockets carry the mark the
        # hooks let through, or its queries would come back to it.
        self.redirected = redirect_endpoints(ipv6_available()) if settings.dns_redirect else ()
        self.mark = DNS_MARK if settings.dns_redirect else 0
        if self.mark:
            check_mark(self.mark, "the proxy's upstream sockets")
        self.live = LivePolicy(io, files=self.files)
        self.host = settings.host_name
        feeds = io.connect_feeds()
        self.enrich, self.persist = feeds["dns_mappings"], feeds["audit_records"]
        self.allow = AllowClient(io, self.selector, self.timers, self.clock)
        self.answer_latency = io.histogram("answer_latency_seconds")
        if self.generation is None:
            self.pinned = PinnedGeneration(settings.bpf_dir)
            self.generation = self.pinned.read
        for endpoint in self.listen:
            self._bind(endpoint)
        for endpoint in self.redirected:
            if endpoint not in self.listen:
                self._bind(endpoint, freebind=True)
        io.watch_fd(self.selector.fileno(), self._on_ready)
        listening = [str(endpoint) for endpoint in self.listen]
        io.report_layer("dns_proxy", "on", f"answering on {', '.join(listening)} (udp, tcp), "
                        f"forwarding to {self.upstream}", listen=listening,
                        upstream=str(self.upstream), filter=settings.dns_filter)
        io.ready = True
        io.log.info("answering on %s (udp, tcp), forwarding to %s; %r; filter %s, %s mode; %s",
                    ", ".join(map(str, self.listen)), self.upstream, self.policy,
                    "on" if settings.dns_filter else "off", settings.mode,
                    f"redirected queries arrive on {', '.join(map(str, self.redirected))}"
                    if self.redirected else "no DNS redirect (SLUICE_DNS_REDIRECT=false)")

    def _bind(self, endpoint: Endpoint, freebind: bool = False) -> None:
        family = socket.AF_INET6 if endpoint.version == 6 else socket.AF_INET
        for kind, label in ((socket.SOCK_DGRAM, "udp"), (socket.SOCK_STREAM, "tcp")):
            sock = socket.socket(family, kind)
            self.listeners.append(sock)
            if kind == socket.SOCK_STREAM:
                # A restarted stage must not wait for the old connections' TIME_WAIT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if freebind:
                sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            try:
                sock.bind(endpoint.sockaddr)
            except OSError as err:
                raise ListenError(f"cannot listen on {endpoint}/{label}: {err.strerror}"
                                  f"{holder_text(endpoint, label, self.files)}") from None
            sock.setblocking(False)
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
                self.selector.register(sock, selectors.EVENT_READ,
                                       lambda mask, s=sock: self._accept(s))
            else:
                self.selector.register(sock, selectors.EVENT_READ,
                                       lambda mask, s=sock: self._on_udp_query(s))

    def teardown(self) -> None:
        for exchange in list(self.exchanges):
            exchange.abandon()
        for client in list(self.tcp_clients):
            client.close()
        for sock in self.listeners:
            sock.close()
        self.selector.close()
        if self.pinned is not None:
            self.pinned.close()

    # ------------------------------------------------------------- the loop's hooks

    def _on_ready(self) -> None:
        for key, mask in self.selector.select(0):
            key.data(mask)
        self.timers.run_due(time.monotonic())
        self._flush_records()  # mappings reach enrich before the client's first packet can

    def tick(self, now: float) -> None:
        self.timers.run_due(now)
        self.allow.drain()
        self._flush_records()
        self.live.tick(now)

    def hangup(self) -> None:
        self.live.reload("SIGHUP")

    @property
    def policy(self):
        return self.live.current

    def _flush_records(self) -> None:
        for batch in batched(self.mappings, self.settings.batch_max):
            self.enrich.send(batch)
        for batch in batched(self.audits, self.settings.batch_max):
            self.persist.send(batch)
        self.mappings, self.audits = [], []

    # ------------------------------------------------------------- queries in

    def _on_udp_query(self, sock: socket.socket) -> None:
        for _ in range(UDP_BURST):
            try:
                data, address = sock.recvfrom(MAX_MESSAGE)
            except OSError:
                return
            self.on_query(data, UdpClient(sock, address, self.io.counters))

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, peer = listener.accept()
        except OSError:
            return
        held = [Held(c, c.address, c.idle_since) for c in self.tcp_clients]
        room = make_room(peer[0], held, MAX_TCP_CLIENTS, MAX_TCP_PER_ADDRESS)
        if room.evict is not None:
            self.io.counters.add("tcp_idle_evicted")
            room.evict.close()
        if not room.admit:
            self.io.counters.add("tcp_clients_refused")
            sock.close()
            return
        self.tcp_clients.add(TcpClient(self, sock, peer[0]))

    def on_query(self, data: bytes, client) -> None:
        self.io.counters.add("queries")
        client = Timed(client, self.answer_latency)
        if not self._answered_from_cache(data, client):
            self._on_full_query(data, client)

    def _answered_from_cache(self, data: bytes, client) -> bool:
        """The cache-hit path: a simple query, a live answer, a name the policy lets through
        whatever the learned targets hold, room in flight. False leaves the query to the
        full path, which decides (and counts) everything else the same way."""
        simple = packets.simple_question(data)
        if simple is None:
            return False
        question, udp_limit = simple
        cached = self.cache.live(packets.question_key(question), time.monotonic())
        if cached is None:
            return False
        query = packets.known_query(data, question, cached.qname, udp_limit)
        if self.settings.dns_filter and not self.names.of(self.policy, query.name)[1]:
            return False
        if self._overloaded():
            return False
        self.io.counters.add("cache_hits")
        self._answer(query, client, cached.wire, cached.facts)
        return True

    def _overloaded(self) -> bool:
        return len(self.exchanges) + self.allow_in_flight >= MAX_IN_FLIGHT

    def _on_full_query(self, data: bytes, client) -> None:
        counters = self.io.counters
        try:
            query = packets.parse_query(data)
        except Malformed as err:
            counters.add("malformed")
            self.io.log.debug("dropped a malformed query: %s", err)
            client.dropped()
            return
        if query.opcode != packets.OPCODE_QUERY:
            counters.add("not_implemented")
            client.send(packets.reply(query, packets.NOTIMP), query)
            return
        if query.question and self.settings.dns_filter and self._refused(query):
            counters.add("refused")
            client.send(packets.reply(query, packets.REFUSED), query)
            return
        if self._overloaded():
            counters.add("overloaded")
            self._servfail(query, client)
            return
        cached = self.cache.live(query.cache_key, time.monotonic()) if query.question else None
        if cached is not None:
            counters.add("cache_hits")
            self._answer(query, client, cached.wire, cached.facts)
        else:
            self._forward(query, client)

    def _refused(self, query: Query) -> bool:
        """Judge the question; a refused one is recorded. True when it must not be asked."""
        name = query.name
        if self.names.of(self.policy, name)[1] or judge_query(
                self.policy, self.learned, name, query.qtype, time.monotonic()) != REFUSE:
            return False
        now_ns = self.clock()
        self.audits.append(normalize(AuditEvent(
            timestamp=now_ns, event_type="dns_blocked", dst_hostname=name,
            event_id=new_event_id(now_ns), host=self.host), self.settings.audit_mode, now_ns))
        self.io.counters.add("dns_blocked")
        return not self.settings.audit_mode

    def _servfail(self, query: Query, client) -> None:
        self.io.counters.add("servfail")
        client.send(packets.reply(query, packets.SERVFAIL), query)

    # ------------------------------------------------------------- upstream and answers

    def _forward(self, query: Query, client) -> None:
        def done(wire: bytes | None) -> None:
            if wire is None:
                self._servfail(query, client)
            else:
                self._on_upstream_answer(query, client, wire)

        UpstreamExchange(self, query.question, query.wire, done)

    def _on_upstream_answer(self, query: Query, client, wire: bytes) -> None:
        if packets.rcode_of(wire) != packets.NOERROR:
            client.send(packets.with_id(wire, query.id), query)
            return
        facts = parse_answer(wire)
        if facts is None:
            self.io.counters.add("malformed_answers")
            self._servfail(query, client)
            return
        self.cache.store(query.cache_key, query.qname, wire, facts, time.monotonic())
        self._answer(query, client, wire, facts)

    def _answer(self, query: Query, client, wire: bytes, facts: AnswerFacts) -> None:
        """Enforcement first (reference §5.4), then the answer, with the client's id."""
        def release(ok: bool) -> None:
            self.allow_in_flight -= 1
            if ok or self.settings.audit_mode:
                client.send(packets.with_id(wire, query.id), query)
            else:
                self._servfail(query, client)

        self.allow_in_flight += 1
        self._enforce(query.name, facts, 0, release)

    def _enforce(self, name: str, facts: AnswerFacts, depth: int,
                 done: Callable[[bool], None]) -> None:
        now = time.monotonic()
        verdict = self.names.of(self.policy, name)[0]
        plan = plan_answer(self.policy, self.learned, name, facts, now, depth, verdict)
        if plan.mapping_chain is not None:
            self.mappings.append(DnsMapping(name, list(facts.ips), facts.ttl,
                                            list(plan.mapping_chain), self.clock()))
        if plan.pre_resolve and self.pre_resolving < MAX_PRE_RESOLVING and (
                self.pre_resolved.claim(plan.pre_resolve, now)):
            self._pre_resolve(plan.pre_resolve, depth + 1)
        # The mapping leaves before the answer can: policy's reply may be read, and the
        # answer sent, within this same turn of the loop.
        self._flush_records()
        if plan.ask is None:
            done(True)
        else:
            self._open(plan.ask, facts, done)

    def _open(self, ask: AllowAsk, facts: AnswerFacts, done: Callable[[bool], None]) -> None:
        """Have the policy stage open the answer's addresses, unless it already confirmed
        them all for this name at the maps' current generation."""
        generation = self.generation()
        if self.confirmed.covers(ask.name, facts.ips, generation):
            self.io.counters.add("already_open")
            done(True)
            return

        def answered(ok: bool) -> None:
            if ok:
                self.confirmed.confirm(ask.name, facts.ips, generation)
            done(ok)

        self.allow.request(ask, facts, answered)

    def _pre_resolve(self, target: str, depth: int) -> None:
        """Resolve a CNAME target the answer stopped at, so its addresses are open before
        the client asks for them (reference §5.4 step 7). Failures only reach the debug log."""
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            message = dns.message.make_query(target, rdtype, use_edns=0,
                                             payload=PRE_RESOLVE_PAYLOAD)
            wire = message.to_wire()
            question = packets.parse_query(wire).question
            self.io.counters.add("pre_resolutions")
            self.pre_resolving += 1
            UpstreamExchange(self, question, wire,
                             lambda answer: self._on_pre_resolved(target, answer, depth))

    def _on_pre_resolved(self, target: str, wire: bytes | None, depth: int) -> None:
        self.pre_resolving -= 1
        facts = parse_answer(wire) if wire and packets.rcode_of(wire) == packets.NOERROR else None
        if facts is None:
            self.io.log.debug("pre-resolving %s gave no usable answer", target)
            return
        self._enforce(target, facts, depth, lambda ok: None)


def parse_answer(wire: bytes) -> AnswerFacts | None:
    try:
        return answer_facts(dns.message.from_wire(wire))
    except (dns.exception.DNSException, ValueError):
        return None


def holder_text(endpoint: Endpoint, label: str, files: HostFiles) -> str:
    """' (held by NAME pid N)' from /proc, or '' when nobody visible holds it."""
    tables = [f"/proc/net/{label}"] if endpoint.version == 4 else []
    tables.append(f"/proc/net/{label}6")  # a dual-stack [::] socket holds IPv4 ports too
    inodes: set[int] = set()
    for table in tables:
        inodes.update(holder_inodes(files.read(table), endpoint.host, endpoint.port,
                                    tcp=label == "tcp"))
    holders = sorted(_processes_holding(inodes)) if inodes else []
    return f" (held by {', '.join(holders)})" if holders else ""


def _processes_holding(inodes: set[int]) -> set[str]:
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in wanted for fd in fd_dir.iterdir()):
                comm = (fd_dir.parent / "comm").read_text().strip()
                found.add(f"{comm} pid {fd_dir.parent.name}")
        except OSError:
            continue  # the process exited, or its descriptors are not ours to read
    return found


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(DnsStage(), settings, ctx=ctx, stop=stop)
