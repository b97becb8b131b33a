"""What the export tests share: stored events, a store to add them to, syslog receivers and a
parser for what they get, a free port, and a retry delay that does not wait."""

from __future__ import annotations

import re
import socket
import threading

from pipeline.audit.records import AuditEvent, new_event_id
from pipeline.audit.store import AuditStore

T0 = 1_767_225_600_000_000_000
KINDS = ("connection_allowed", "connection_blocked", "connection_late_allowed",
         "protocol_blocked", "dns_blocked")


def fast_retry(failures, retry_after=None):
    return 0.05


def event(i: int, host: str = "test-host", kind: str | None = None, **fields) -> AuditEvent:
    kind = kind or KINDS[i % len(KINDS)]
    values = dict(timestamp=T0 + i * 1_000_003, event_type=kind, src_ip="10.0.0.2",
                  dst_ip=f"93.184.{i % 7}.{i % 200}", dst_port=0 if kind == "dns_blocked" else 443,
                  protocol="" if kind == "dns_blocked" else "TCP", process="curl", pid=1000 + i,
                  dst_hostname=f"h{i % 9}.example" if i % 3 else "",
                  matched_rule="*.example" if kind == "connection_late_allowed" else "",
                  cname_chain=["a.example", "b.example"] if i % 11 == 0 else [],
                  blocked=kind in ("connection_blocked", "protocol_blocked", "dns_blocked"),
                  packets=1 + i % 3, event_id=new_event_id(T0 + i), host=host)
    values.update(fields)
    return AuditEvent(**values)


class Store:
    def __init__(self, url: str) -> None:
        self.store = AuditStore(url)
        self.store.migrate()
        self.next = 0

    def add(self, count: int, **fields) -> list[AuditEvent]:
        events = [event(self.next + i, **fields) for i in range(count)]
        self.next += count
        assert self.store.write(events) == count
        return events

    def close(self) -> None:
        self.store.close()


RFC5424 = re.compile(
    r"<(?P<pri>\d{1,3})>1 (?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?Z) "
    r"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    r"(?P<msgid>[!-~]{1,32}) (?P<sd>-|(?:\[[^ \]]+(?: [^= \]\"]+=\"(?:[^\"\\\]]|\\.)*\")*\])+)"
    r"(?: (?P<msg>.*))?", re.S)
SD_PARAM = re.compile(r'([^= \]"]+)="((?:[^"\\\]]|\\.)*)"')


def parse_syslog(line: str) -> dict:
    match = RFC5424.fullmatch(line)
    assert match, f"not RFC 5424: {line!r}"
    fields = match.groupdict()
    fields["params"] = {k: re.sub(r"\\(.)", r"\1", v) for k, v in SD_PARAM.findall(fields["sd"])}
    return fields


class SyslogListener:
    """A local syslog receiver: unix datagrams, UDP datagrams or TCP with octet counting."""

    def __init__(self, transport: str, tmp_path) -> None:
        self.lines: list[str] = []
        if transport == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            path = tmp_path / "log.sock"
            self.sock.bind(str(path))
            self.target = f"unix://{path}"
        else:
            kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
            self.sock = socket.socket(socket.AF_INET, kind)
            self.sock.bind(("127.0.0.1", 0))
            self.target = f"{transport}://127.0.0.1:{self.sock.getsockname()[1]}"
            if transport == "tcp":
                self.sock.listen(4)
        self.transport = transport
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.transport != "tcp":
            while self.running:
                try:
                    self.lines.append(self.sock.recv(65536).decode("utf-8"))
                except TimeoutError:
                    continue
            return
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.2)
            buffer = b""
            while self.running:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                buffer += data
                while b" " in buffer:  # RFC 6587 octet counting: "LEN SP MSG"
                    length, _, rest = buffer.partition(b" ")
                    if len(rest) < int(length):
                        break
                    self.lines.append(rest[:int(length)].decode("utf-8"))
                    buffer = rest[int(length):]
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
