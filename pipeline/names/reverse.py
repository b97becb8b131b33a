"""Reverse (PTR) lookups beside the stage loop, never in it.

Why asyncio in one background thread, with dnspython's asyncio queries:
* a lookup that takes its whole 500 ms budget costs a coroutine and a socket, not a thread,
  so hundreds run at once (CONCURRENCY) and a burst of new addresses is worked through at
  hundreds per second; a thread pool would need as many threads for the same;
* every query has its own socket (an ephemeral source port chosen by the kernel) and a
  random id, and answers from elsewhere are ignored: a spoofed PTR answer, which could
  name an address after an allowed host, has to guess both;
* the stage loop only hands over addresses (one wakeup of the asyncio loop per batch) and
  reads finished lookups when an eventfd it polls (StageIO.watch_fd) becomes readable.

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

import asyncio
import collections
import dataclasses
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.message
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


class ReverseResolver:
    def __init__(self, nameserver: str, port: int = 53, timeout: float = TIMEOUT_S,
                 concurrency: int = CONCURRENCY, mark: int = 0) -> None:
        self.nameserver, self.port, self.timeout = nameserver, port, timeout
        self.concurrency, self.mark = concurrency, mark
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: collections.deque[Lookup] = collections.deque()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        # Binds to the loop that first waits on it (the worker's, Python 3.10+), so it can be
        # made here, before that loop runs.
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()
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

    def _run(self) -> None:
        """The worker's body: the event loop, until close() stops it."""
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # asyncio would only log a failed callback; it is counted and logged here instead.
        self.worker.survived(context.get("message", "event loop error"),
                             context.get("exception"))

    def submit(self, ips: Iterable[str]) -> None:
        """Start a lookup for each address; safe to call from the stage's thread."""
        ips = list(ips)
        if ips:
            self._loop.call_soon_threadsafe(self._start, ips)

    def _start(self, ips: list[str]) -> None:
        for ip in ips:
            try:
                task = self._loop.create_task(self._lookup(ip))
            except Exception as err:  # noqa: BLE001 - every address gets its Lookup back
                self.worker.survived(f"cannot start a lookup of {ip}", err)
                self._finish(Lookup(ip, ERROR))
                continue
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _finish(self, lookup: Lookup) -> None:
        self._done.append(lookup)
        os.eventfd_write(self.fd, 1)

    async def _lookup(self, ip: str) -> None:
        sent = False
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    sent = True
                    lookup = await self._query(ip)
        except TimeoutError:
            lookup = Lookup(ip, TIMEOUT if sent else NOT_SENT)
        except Exception:  # noqa: BLE001 - a surprise from the library must not strand events
            self.worker.survived(f"reverse lookup of {ip} failed unexpectedly",
                                 sys.exc_info()[1])
            lookup = Lookup(ip, ERROR)
        self._finish(lookup)

    async def _query(self, ip: str) -> Lookup:
        try:
            response = await self._ask(dns.reversename.from_address(ip), dns.rdatatype.PTR)
            answer = first_ptr(response) if response.rcode() == dns.rcode.NOERROR else ""
            if not answer:
                return Lookup(ip, NO_NAME)
            forward = await self._ask(answer, forward_type(ip))
        except (OSError, ValueError, dns.exception.DNSException):
            return Lookup(ip, ERROR)
        if canonical(ip) not in forward_addresses(forward):
            return Lookup(ip, UNCONFIRMED, answer)
        return Lookup(ip, NAMED, answer)

    async def _ask(self, name, rdtype) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        if not self.mark:
            return await dns.asyncquery.udp(query, self.nameserver, port=self.port,
                                            ignore_unexpected=True)
        family = socket.AF_INET6 if ":" in self.nameserver else socket.AF_INET
        sock = await dns.asyncbackend.get_backend("asyncio").make_socket(family,
                                                                         socket.SOCK_DGRAM)
        try:  # marked before its first send, which is where the redirect would act
            sock.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET,
                                                               socket.SO_MARK, self.mark)
            return await dns.asyncquery.udp(query, self.nameserver, port=self.port,
                                            ignore_unexpected=True, sock=sock)
        finally:
            await sock.close()

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
        """Cancel what is in flight and stop the thread; never waits for a lookup."""
        self._stopping.set()
        thread = self.worker.thread
        if thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop)
            thread.join(timeout=2)
        if not thread.is_alive():  # a loop still running may yet write the fd
            self._loop.close()
            os.close(self.fd)

    def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Let the cancelled lookups close their sockets before the loop stops.
        cancelled = asyncio.gather(*self._tasks, return_exceptions=True)
        cancelled.add_done_callback(lambda _: self._loop.stop())
