"""The proxy's listening sockets: bound at start, UDP queries read, TCP clients admitted.

A UDP query comes with the kernel's time of its arrival (SO_TIMESTAMPNS), so the stage can
tell how long it waited in the socket: the proxy's own wait for a CPU. A TCP newcomer gets
a slot as pipeline/dns/tcpslots.py decides (an idle connection may be closed for it). An
address that cannot be bound is a ListenError naming the address and, from /proc, the
process holding it.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from collections.abc import Callable
from typing import Protocol, cast

from ...errors import ExitCode, SluiceError
from ...hostfiles import HostFiles
from ...reactor import READ, Reactor
from ..endpoints import Endpoint
from ..holders import holder_inodes
from ..tcpslots import Held, make_room
from .clients import MAX_MESSAGE, Client, Counters, TcpClient, UdpClient

MAX_TCP_CLIENTS = 256
MAX_TCP_PER_ADDRESS = 64  # one client address's share of the TCP slots
UDP_BURST = 64            # datagrams read from one socket before looking at the others
IP_FREEBIND = 15          # bind before capture has put the address on lo
# Linux: each datagram's arrival time, a timespec of CLOCK_REALTIME. While any socket asks,
# the kernel stamps every packet the host receives: one clock read each, tens of
# nanoseconds (chrony, tcpdump and the like turn the same on).
SO_TIMESTAMPNS = 35
MAX_WAIT_S = 10.0         # beyond this, a wall clock step rather than a wait
_TIMESPEC = struct.Struct("qq")
ANCILLARY_BYTES = socket.CMSG_SPACE(_TIMESPEC.size)  # room for the arrival time


class QueryHandler(Protocol):
    def __call__(self, data: bytes, client: Client, waited: float = 0.0) -> None:
        """waited: seconds between the query's arrival in the socket and its reading."""


class ListenError(SluiceError):
    exit_code = ExitCode.DNS_LISTEN


class Listeners:
    """Every listening socket and the TCP clients they accepted; on_query(data, client,
    waited) takes each query."""

    def __init__(self, reactor: Reactor, counters: Counters, tcp_idle_s: float,
                 on_query: QueryHandler, files: HostFiles,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.reactor, self.counters, self.tcp_idle_s = reactor, counters, tcp_idle_s
        self.on_query, self.files, self.wall_ns = on_query, files, wall_ns
        self.sockets: list[socket.socket] = []
        self.tcp_clients: set[TcpClient] = set()

    def bind(self, endpoint: Endpoint, freebind: bool = False) -> None:
        family = socket.AF_INET6 if endpoint.version == 6 else socket.AF_INET
        for kind, label in ((socket.SOCK_DGRAM, "udp"), (socket.SOCK_STREAM, "tcp")):
            sock = socket.socket(family, kind)
            self.sockets.append(sock)
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
            else:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            handler = self._accept if kind == socket.SOCK_STREAM else self._on_udp
            self.reactor.register(sock, READ, _when_ready(handler, sock))

    def _on_udp(self, sock: socket.socket) -> None:
        for _ in range(UDP_BURST):
            try:
                data, ancillary, _flags, address = sock.recvmsg(MAX_MESSAGE, ANCILLARY_BYTES)
            except OSError:
                return
            self.on_query(data, UdpClient(sock, address, self.counters),
                          self._waited(ancillary))

    def _waited(self, ancillary: list[tuple[int, int, bytes]]) -> float:
        # Just after the first socket of the host asks for stamps, the kernel may stamp a
        # datagram when it is read instead (turning stamps on is deferred): a wait of 0.
        arrived = arrival_ns(ancillary)
        if arrived is None:
            return 0.0
        waited = (self.wall_ns() - arrived) / 1e9
        return waited if 0.0 <= waited <= MAX_WAIT_S else 0.0

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, peer = listener.accept()
        except OSError:
            return
        held = [Held(c, c.address, c.idle_since) for c in self.tcp_clients]
        room = make_room(peer[0], held, MAX_TCP_CLIENTS, MAX_TCP_PER_ADDRESS)
        if room.evict is not None:
            self.counters.add("tcp_idle_evicted")
            cast(TcpClient, room.evict).close()
        if not room.admit:
            self.counters.add("tcp_clients_refused")
            sock.close()
            return
        self.tcp_clients.add(TcpClient(self.reactor, sock, peer[0], self.tcp_idle_s,
                                       self.counters, self.on_query, self.tcp_clients.discard))

    def close(self) -> None:
        for client in list(self.tcp_clients):
            client.close()
        for sock in self.sockets:
            sock.close()


def arrival_ns(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """A datagram's arrival (ns of CLOCK_REALTIME) from recvmsg's ancillary data on a socket
    with SO_TIMESTAMPNS; None without it."""
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS \
                and len(value) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(value)
            return int(seconds) * 1_000_000_000 + int(nanoseconds)
    return None


def _when_ready(handler: Callable[[socket.socket], None],
                sock: socket.socket) -> Callable[[int], None]:
    return lambda _mask: handler(sock)


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
