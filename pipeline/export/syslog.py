"""Audit rows as RFC 5424 syslog messages, and the socket that carries them.

Only the records a SIEM alerts on become messages: blocked and would-be-blocked ones
(`blocked` or `would_deny` set), late-allowed connections and refused DNS names (every
`dns_blocked` record, whether audit mode forwarded the name or not). One message:

    <PRI>1 TIMESTAMP HOST sluice PID EVENT_TYPE [sluice@32473 dst_ip="..." ...] TEXT

* PRI: facility 13 (log audit); severity 4 (warning) when the record says blocked in enforce
  mode, 5 (notice) otherwise (would-deny, late-allowed, a name refused in audit mode);
* TIMESTAMP: the record's time, UTC, microseconds (RFC 5424 allows six digits);
* MSGID: the event type; structured data `sluice@32473` (the example enterprise number of
  RFC 5612) holds the record's non-empty fields, escaped as RFC 5424 §6.3.3 says;
* TEXT: one human line, `blocked curl (pid 42) -> example.com (93.184.216.34):443/TCP`.

Transports (SLUICE_SYSLOG): `unix:///dev/log` (a datagram per message, as the local syslog
daemon reads it), `udp://host:port` (a datagram per message, RFC 5426), `tcp://host:port`
(octet-counting framing, RFC 6587 §3.4.1, as RFC 5425 requires on TLS).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Sequence

from .delivery import DeliveryFailed

FACILITY = 13              # log audit
WARNING, NOTICE = 4, 5
SD_ID = "sluice@32473"
APP_NAME = "sluice"
SEND_TIMEOUT_S = 5.0
MAX_LINE = 8192            # a receiver's usual limit; longer messages lose their text first


@dataclasses.dataclass(frozen=True)
class Target:
    transport: str  # unix, udp, tcp
    address: str | tuple[str, int]  # a path, or (host, port)
    shown: str


def parse_target(text: str) -> Target:
    """SLUICE_SYSLOG -> Target; ValueError if it is none of the three forms."""
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme not in ("unix", "udp", "tcp"):
        raise ValueError("must be unix:///path, udp://host:port or tcp://host:port")
    if scheme == "unix":
        if not rest.startswith("/"):
            raise ValueError("unix:// needs an absolute socket path (unix:///dev/log)")
        return Target("unix", rest, f"unix://{rest}")
    host, colon, port = rest.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{scheme}:// needs host:port")
    return Target(scheme, (host, int(port)), f"{scheme}://{rest.rstrip('/')}")


# ---------------------------------------------------------------- formatting


_NOT_PARAMS = frozenset({"id", "timestamp"})


def wanted(row: dict) -> bool:
    return bool(row.get("blocked") or row.get("would_deny")
                or row.get("event_type") in ("connection_late_allowed", "dns_blocked"))


def _printable(text: str) -> str:
    """Control characters (a line break in a process name) as spaces."""
    return text if text.isprintable() else "".join(c if c.isprintable() else " " for c in text)


def _sd_value(text: str) -> str:
    if "\\" in text or '"' in text or "]" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return _printable(text)


def _header_field(text: str, limit: int) -> str:
    """PRINTUSASCII without spaces, at most limit characters; "-" when empty."""
    if not (text.isascii() and text.isprintable() and " " not in text):
        text = "".join(c for c in text if 33 <= ord(c) <= 126)
    return text[:limit] or "-"


def _time(stored: str) -> str:
    """`2026-01-01T10:00:00.123456789Z` (the store's form) -> six fractional digits."""
    if len(stored) == 30 and stored[19] == ".":
        return stored[:26] + "Z"
    return stored or "-"


def _summary(row: dict) -> str:
    kind = row["event_type"]
    if kind == "dns_blocked":
        verb = "refused DNS name" if row.get("blocked") else "would refuse DNS name"
        return f"{verb} {row.get('dst_hostname', '')}"
    if kind == "connection_late_allowed":
        verb = "late-allowed"
    else:
        verb = "blocked" if row.get("blocked") else "would block"
    who = row.get("process") or "?"
    if row.get("pid"):
        who += f" (pid {row['pid']})"
    where = row.get("dst_ip", "")
    if row.get("dst_hostname"):
        where = f"{row['dst_hostname']} ({where})"
    port = f":{row['dst_port']}" if row.get("dst_port") else ""
    protocol = f"/{row['protocol']}" if row.get("protocol") else ""
    rule = f" by rule {row['matched_rule']}" if row.get("matched_rule") else ""
    return f"{verb} {who} -> {where}{port}{protocol}{rule}"


def format_message(row: dict, pid: int) -> bytes:
    """One RFC 5424 message (no framing, no trailing newline) for one audit row (a dict of
    the audit_events columns; cname_chain as stored, JSON text)."""
    severity = WARNING if row.get("blocked") else NOTICE
    params = []
    for name, value in row.items():
        if value is True or value is False:
            params.append(f'{name}="{"true" if value else "false"}"')
        elif value and name not in _NOT_PARAMS:  # cname_chain stays its stored JSON text
            params.append(f'{name}="{_sd_value(str(value))}"')
    header = (f"<{FACILITY * 8 + severity}>1 {_time(row.get('timestamp', ''))} "
              f"{_header_field(row.get('host', ''), 255)} {APP_NAME} {pid} "
              f"{_header_field(row['event_type'], 32)}")
    message = f"{header} [{SD_ID} {' '.join(params)}] "
    text = _printable(_summary(row))
    data = message.encode()
    room = MAX_LINE - len(data)
    body = text.encode()
    if not text.isascii():
        body = b"\xef\xbb\xbf" + body  # RFC 5424 §6.4: a BOM marks UTF-8 text
    return data + body[:max(0, room)]


# ---------------------------------------------------------------- sending


class SyslogClient:
    """Sends messages; one socket, opened again after a failure."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self.sock is None:
            kind, address = self.target.transport, self.target.address
            if isinstance(address, str):  # unix
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            else:
                host, port = address
                family = socket.getaddrinfo(host, port)[0][0]
                sock = socket.socket(family, socket.SOCK_STREAM if kind == "tcp"
                                     else socket.SOCK_DGRAM)
            sock.settimeout(SEND_TIMEOUT_S)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            self.sock = sock
        return self.sock

    def send(self, messages: Sequence[bytes]) -> None:
        """Send every message; DeliveryFailed(delivered=k) after the first k got out."""
        sent = 0
        try:
            sock = self._socket()
            if self.target.transport == "tcp":
                sock.sendall(b"".join(b"%d %s" % (len(m), m) for m in messages))
                return
            for message in messages:
                sock.send(message)
                sent += 1
        except OSError as err:
            self.close()
            # TCP: what went out before the failure is unknown; all of it is sent again.
            raise DeliveryFailed(_describe(err), delivered=sent) from None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _describe(err: OSError) -> str:
    if isinstance(err, socket.gaierror):
        return "host name not resolved"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "no answer in time"
    return (err.strerror or type(err).__name__).lower() if err.errno else type(err).__name__
