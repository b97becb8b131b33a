"""Reverse (PTR) lookups beside the stage loop, never in it.

Why one background thread with a selector of its own and questions written by hand:
* a lookup that takes its whole 500 ms budget costs a socket and a few bytes of state, not
  a thread, so hundreds run at once (CONCURRENCY) and a burst of new addresses is worked
  through at hundreds per second; a thread pool would need as many threads for the same;
* a question is a header of a few bytes before dnspython's wire form of the name, and most
  answers a scan gets are NXDOMAIN, which the header alone says: dnspython parses only an
  answer that names something. Asked through dnspython's asyncio queries, a lookup cost
  enrich about 250 us of CPU (a flood's few hundred lookups a quarter of its CPU beside
  the events); this way about 35;
* every question has its own socket (an ephemeral source port chosen by the kernel, and
  connected, so only the nameserver's datagrams reach it) and a random id, and a datagram
  that does not answer the question asked (another id, another question, not a response)
  is ignored: a spoofed PTR answer, which could name an address after an allowed host, has
  to guess both;
* the stage loop only hands over addresses (one write to an eventfd per batch) and reads
  finished lookups when an eventfd it polls (StageIO.watch_fd) becomes readable.

Each submitted address gets exactly one Lookup back, within `timeout` of its submission:
the budget covers waiting for a free slot too, so nothing waits longer. A lookup whose
budget ran out before it could be sent comes back as "not_sent" (no query was made).

With the DNS redirect on, enrich asks the proxy's own upstream from sockets carrying the
mark the redirect lets through: sluice's lookups are not a client's, and through the proxy a
forward confirmation of a name the policy refuses would be refused (and recorded as a
dns_blocked no program caused).

Forward-confirmed (a deviation from cargowall): whoever controls an address's reverse zone
chooses its PTR name, so a PTR answer alone would let anyone name their server after an
allowed host and be late-allowed. A name is used only when its own A/AAAA records, asked
within the same budget, include the address; otherwise the lookup is "unconfirmed".
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.reversename

from ..addresses import canonical
from ..workers import Worker

log = logging.getLogger("sluice.enrich")

TIMEOUT_S = 0.5     # reference §2.2: the budget of one reverse lookup
CONCURRENCY = 256   # queries in flight at once (each holds a socket)
RESOLV_CONF = Path("/etc/resolv.conf")
DEFAULT_NAMESERVER = "127.0.0.1"  # what the C library uses when resolv.conf names none

# Lookup outcomes
NAMED, NO_NAME, TIMEOUT, ERROR, NOT_SENT = "named", "no_name", "timeout", "error", "not_sent"
UNCONFIRMED = "unconfirmed"  # a PTR name whose forward records do not include the address


@dataclasses.dataclass(frozen=True, slots=True)
class Lookup:
    ip: str
    outcome: str      # one of NAMED, NO_NAME, TIMEOUT, ERROR, NOT_SENT, UNCONFIRMED
    answer: str = ""  # the first PTR name as the server wrote it (trailing dot included)


def system_nameserver(resolv_conf: str) -> str:
    """The first nameserver of a resolv.conf text: the system resolver."""
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            return fields[1]
    return DEFAULT_NAMESERVER


def forward_type(ip: str) -> dns.rdatatype.RdataType:
    return dns.rdatatype.AAAA if ":" in ip else dns.rdatatype.A


# A standard query, recursion desired, one question (the id goes in front).
_QUERY_FLAGS = b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
_HEADER = 12


def forward_addresses(response: dns.message.Message) -> set[str]:
    """Every A/AAAA address of an answer (through CNAMEs), in canonical text."""
    if response.rcode() != dns.rcode.NOERROR:
        return set()
    return {canonical(rdata.address) for rrset in response.answer
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rdata in rrset}


def first_ptr(response: dns.message.Message) -> str:
    """The first PTR name of an answer; through a CNAME too (RFC 2317 classless zones)."""
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.PTR and len(rrset):
            return rrset[0].target.to_text()
    return ""


class ReverseLookups(Protocol):
    """What enrich asks of its reverse lookups: ReverseResolver, or a replay's stand-in."""

    @property
    def fd(self) -> int:
        """An eventfd that becomes readable when lookups have finished."""

    @property
    def worker(self) -> Worker | None:
        """The thread the lookups run in, for the loop to watch (None: no thread)."""

    def start(self) -> None: ...

    def submit(self, ips: Iterable[str]) -> None: ...

    def finished(self) -> list[Lookup]: ...

    def close(self) -> None: ...


class _Question:
    """One address's lookup: its PTR question, then the name's forward one."""

    __slots__ = ("ip", "slot", "sock", "query_id", "question", "ptr", "done")

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.slot = False    # it holds one of the concurrency slots
        self.sock: socket.socket | None = None
        self.query_id = b""
        self.question = b""  # name, type and class as sent
        self.ptr = ""        # the PTR name, once its forward question is asked
        self.done = False

    def answers(self, data: bytes) -> bool:
        """Whether a datagram is the response to the question in flight (not another id,
        another question, or a query)."""
        end = _HEADER + len(self.question)
        return (len(data) >= end and data[:2] == self.query_id and data[2] & 0xF8 == 0x80
                and data[4:6] == b"\x00\x01"
                and data[_HEADER:end - 4].lower() == self.question[:-4].lower()
                and data[end - 4:end] == self.question[-4:])


class ReverseResolver:
    def __init__(self, nameserver: str, port: int = 53, timeout: float = TIMEOUT_S,
                 concurrency: int = CONCURRENCY, mark: int = 0) -> None:
        self.nameserver, self.port, self.timeout = nameserver, port, timeout
        self.concurrency, self.mark = concurrency, mark
        self.family = socket.AF_INET6 if ":" in nameserver else socket.AF_INET
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: collections.deque[Lookup] = collections.deque()
        self._submitted: collections.deque[tuple[str, float]] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._waiting: collections.deque[_Question] = collections.deque()  # for a free slot
        self._in_flight = 0
        self._deadlines: list[tuple[float, int, _Question]] = []
        self._order = itertools.count()
        self._ended = 0
        self._stopping = threading.Event()
        self.worker = Worker("lookups", self._run, log, stopping=self._stopping)

    @classmethod
    def from_resolv_conf(cls, path: Path = RESOLV_CONF, **kw) -> ReverseResolver:
        try:
            text = path.read_text()
        except OSError:
            text = ""
        return cls(system_nameserver(text), **kw)

    def __repr__(self) -> str:
        marked = f", mark {self.mark:#x}" if self.mark else ""
        return f"ReverseResolver({self.nameserver}:{self.port}, {self.timeout:g} s{marked})"

    def start(self) -> None:
        self.worker.start()

    def submit(self, ips: Iterable[str]) -> None:
        """Start a lookup for each address; safe to call from the stage's thread."""
        deadline = time.monotonic() + self.timeout
        before = len(self._submitted)
        self._submitted.extend((ip, deadline) for ip in ips)
        if len(self._submitted) != before:
            os.eventfd_write(self._wake, 1)

    def finished(self) -> list[Lookup]:
        """Lookups that ended since the last call (reading resets the eventfd)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        done = []
        while self._done:
            done.append(self._done.popleft())
        return done

    def close(self) -> None:
        """Stop the thread and close what is in flight; never waits for a lookup."""
        self._stopping.set()
        thread = self.worker.thread
        if thread.is_alive():
            os.eventfd_write(self._wake, 1)
            thread.join(timeout=2)
        if not thread.is_alive():  # a loop still running may yet write the fds
            for key in list(self._selector.get_map().values()):
                if isinstance(key.data, _Question) and key.data.sock is not None:
                    key.data.sock.close()
            self._selector.close()
            os.close(self._wake)
            os.close(self.fd)

    # ------------------------------------------------------------- the thread

    def _run(self) -> None:
        """The worker's body: turns of the selector until close()."""
        while not self._stopping.is_set():
            self._turn()

    def _turn(self) -> None:
        wait = None
        if self._deadlines:
            wait = max(0.0, self._deadlines[0][0] - time.monotonic())
        for key, _ in self._selector.select(wait):
            if key.data is None:
                self._take_submitted()
            else:
                self._answered(key.data)
        self._expire(time.monotonic())
        self._ask_waiting()
        if self._ended:
            self._ended = 0
            os.eventfd_write(self.fd, 1)

    def _take_submitted(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while self._submitted:
            ip, deadline = self._submitted.popleft()
            question = _Question(ip)
            self._waiting.append(question)
            heapq.heappush(self._deadlines, (deadline, next(self._order), question))

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            question = heapq.heappop(self._deadlines)[2]
            if not question.done:
                self._finish(question, TIMEOUT if question.slot else NOT_SENT)

    def _ask_waiting(self) -> None:
        while self._waiting and self._in_flight < self.concurrency:
            question = self._waiting.popleft()
            if question.done:
                continue
            self._in_flight += 1
            question.slot = True
            self._guarded(question, self._ask, question,
                          dns.reversename.from_address(question.ip), dns.rdatatype.PTR)

    def _guarded(self, question: _Question, step, *args) -> None:
        """One lookup's step; an error ends that lookup alone (ERROR), never the others."""
        try:
            step(*args)
        except (OSError, ValueError, dns.exception.DNSException):
            self._finish(question, ERROR)
        except Exception as err:  # noqa: BLE001 - a surprise must not strand the address
            self.worker.survived(f"reverse lookup of {question.ip} failed unexpectedly", err)
            self._finish(question, ERROR)

    def _ask(self, question: _Question, name: dns.name.Name, rdtype: int) -> None:
        """Send a question from a socket of its own (the previous one, if any, is closed)."""
        self._close_socket(question)
        wire = name.to_wire()
        assert wire is not None, "to_wire without a file returns the bytes"
        query_id, asked = secrets.token_bytes(2), wire + struct.pack("!HH", rdtype, 1)
        sock = socket.socket(self.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            if self.mark:  # marked before its first send, where the redirect would act
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            sock.connect((self.nameserver, self.port))
            sock.send(query_id + _QUERY_FLAGS + asked)
            self._selector.register(sock, selectors.EVENT_READ, question)
        except BaseException:
            sock.close()
            raise
        question.sock, question.query_id, question.question = sock, query_id, asked

    def _answered(self, question: _Question) -> None:
        if question.sock is None:  # ended earlier in the same turn
            return
        try:
            data = question.sock.recv(65535)
        except BlockingIOError:
            return
        except OSError:  # the nameserver's port refused it (ICMP), and the like
            self._finish(question, ERROR)
            return
        if question.answers(data):
            self._guarded(question, self._read_answer, question, data)

    def _read_answer(self, question: _Question, data: bytes) -> None:
        if not question.ptr:
            if data[3] & 0x0F != dns.rcode.NOERROR:  # NXDOMAIN, mostly: no need to parse it
                self._finish(question, NO_NAME)
                return
            answer = first_ptr(dns.message.from_wire(data))
            if not answer:
                self._finish(question, NO_NAME)
                return
            question.ptr = answer
            self._ask(question, dns.name.from_text(answer), forward_type(question.ip))
            return
        confirmed = canonical(question.ip) in forward_addresses(dns.message.from_wire(data))
        self._finish(question, NAMED if confirmed else UNCONFIRMED, question.ptr)

    def _close_socket(self, question: _Question) -> None:
        if question.sock is not None:
            self._selector.unregister(question.sock)
            question.sock.close()
            question.sock = None

    def _finish(self, question: _Question, outcome: str, answer: str = "") -> None:
        if question.done:
            return
        question.done = True
        self._close_socket(question)
        if question.slot:
            self._in_flight -= 1
        self._done.append(Lookup(question.ip, outcome, answer))
        self._ended += 1
