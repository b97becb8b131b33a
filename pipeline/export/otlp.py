"""Audit rows as OpenTelemetry log records, and the OTLP/HTTP client that posts them.

One stored audit record is one log record:
* time: the record's timestamp; observed time: when it was exported;
* body: the event type (`connection_blocked`, ...); event name `sluice.<event type>`;
* severity WARN for a blocked or would-be-blocked record, INFO otherwise;
* attributes named after the record's fields (the audit_events columns, which are the JSONL
  field names), with the JSONL line's omit-empty rule: empty text and zero numbers are left
  out, the flags are always there, `cname_chain` is an array of strings;
* resource: service.name "sluice", service.version, host.name (the record's host), os.type.

The request is built with the generated message classes of the opentelemetry-proto package
(the ones the OpenTelemetry exporters serialize), never by hand. The SDK's own log records
and encoder cost about four times the CPU per record (about 90 against 20 µs when this was
written), too much to keep up with a flood, so sluice fills the messages directly and reuses
attribute messages for the values that repeat (hosts, addresses, processes).

The client posts to <SLUICE_OTLP_ENDPOINT>/v1/logs (the base URL's path, then v1/logs, as
OTEL_EXPORTER_OTLP_ENDPOINT works), gzip-compressed, over one kept-alive connection, with
SLUICE_OTLP_HEADERS and, when the URL has user info, HTTP basic authentication. Every failure
is described without the URL's path, query or user info and without any header value.
"""

from __future__ import annotations

import base64
import calendar
import dataclasses
import functools
import gzip
import http.client
import json
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Sequence

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

from .. import __version__
from .delivery import DeliveryFailed
from ..audit.timestamps import parse_timestamp

LOGS_PATH = "v1/logs"
SCOPE = "sluice"
REQUEST_TIMEOUT_S = 10.0  # the OpenTelemetry exporters' default
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110)


# ---------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Endpoint:
    url: str        # where requests go: the base URL's path + /v1/logs, the query kept
    origin: str     # scheme://host[:port]: all of it that may be logged
    scheme: str
    host: str
    port: int
    target: str     # path and query of the request line
    auth: str = ""  # "Basic ..." from the URL's user info


def parse_endpoint(text: str) -> Endpoint:
    """SLUICE_OTLP_ENDPOINT -> Endpoint; ValueError (never quoting the value) if not a URL."""
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise ValueError("is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an http:// or https:// URL with a host")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    host = parts.hostname
    shown_host = f"[{host}]" if ":" in host else host
    origin = f"{parts.scheme}://{shown_host}" + (f":{port}" if port else "")
    path = parts.path.rstrip("/") + "/" + LOGS_PATH
    target = path + (f"?{parts.query}" if parts.query else "")
    auth = ""
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return Endpoint(url=origin + target, origin=origin, scheme=parts.scheme, host=host,
                    port=port or (443 if parts.scheme == "https" else 80), target=target,
                    auth=auth)


def parse_headers(text: str) -> dict[str, str]:
    """SLUICE_OTLP_HEADERS (`key=value,key=value`, values may be percent-encoded, as in
    OTEL_EXPORTER_OTLP_HEADERS) -> headers; ValueError naming the entry, never its value."""
    headers: dict[str, str] = {}
    if not text.strip():
        return headers
    for number, entry in enumerate(text.split(","), 1):
        name, sep, value = entry.partition("=")
        name, value = name.strip(), urllib.parse.unquote(value.strip())
        if not sep or not _TOKEN.fullmatch(name):
            raise ValueError(f"entry {number} is not key=value with a header name as key")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"entry {number} ({name}) has a line break in its value")
        try:
            value.encode("latin-1")  # what HTTP/1.1 carries; checked here, not mid-send
        except UnicodeEncodeError:
            raise ValueError(f"entry {number} ({name}) has a character an HTTP header cannot "
                             "carry") from None
        headers[name] = value
    return headers


# ---------------------------------------------------------------- encoding


@functools.lru_cache(maxsize=4096)
def _epoch_seconds(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def stored_ns(text: str) -> int:
    """A stored timestamp (fixed-width `...T10:00:00.123456789Z`) -> UTC ns; 0 if unusable."""
    try:
        if len(text) == 30 and text[19] == "." and text[29] == "Z":
            return _epoch_seconds(text[:19]) * 1_000_000_000 + int(text[20:29])
        return parse_timestamp(text)
    except ValueError:
        return 0


# How each field becomes an attribute. Values that repeat from record to record (hosts,
# addresses, processes, flags) get one shared KeyValue message each; unique ones a new one.
_REPEATING, _FLAG, _UNIQUE, _CHAIN = range(4)
_UNIQUE_FIELDS = frozenset({"event_id", "pid", "seq"})
_CACHE_LIMIT = 20_000
_BLOCK_FLAGS = ("blocked", "would_deny")


class LogEncoder:
    """Rows of audit_events (columns as given) -> one serialized ExportLogsServiceRequest."""

    def __init__(self, columns: Sequence[str], booleans: set[str], host: str) -> None:
        self.columns = tuple(columns)
        self.host = host
        self.cache: dict[tuple[str, object], KeyValue] = {}
        self.ts_index = self.columns.index("timestamp")
        self.type_index = self.columns.index("event_type")
        self.flag_indexes = [self.columns.index(c) for c in _BLOCK_FLAGS if c in self.columns]
        self.fields = [(i, c, _FLAG if c in booleans else _CHAIN if c == "cname_chain"
                        else _UNIQUE if c in _UNIQUE_FIELDS else _REPEATING)
                       for i, c in enumerate(self.columns) if c not in ("id", "timestamp")]

    def resource(self) -> list[KeyValue]:
        return [_key_value(k, v) for k, v in (("service.name", "sluice"),
                                              ("service.version", __version__),
                                              ("host.name", self.host), ("os.type", "linux"))]

    def encode(self, rows: Sequence[Sequence], observed_ns: int) -> bytes:
        request = ExportLogsServiceRequest()
        resource_logs = request.resource_logs.add()
        resource_logs.resource.attributes.extend(self.resource())
        scope_logs = resource_logs.scope_logs.add()
        scope_logs.scope.name, scope_logs.scope.version = SCOPE, __version__
        add = scope_logs.log_records.add
        warn, info = SeverityNumber.SEVERITY_NUMBER_WARN, SeverityNumber.SEVERITY_NUMBER_INFO
        for row in rows:
            event_type = row[self.type_index]
            flagged = any(row[i] for i in self.flag_indexes)
            record = add(time_unix_nano=stored_ns(row[self.ts_index]),
                         observed_time_unix_nano=observed_ns,
                         severity_number=warn if flagged else info,
                         severity_text="WARN" if flagged else "INFO",
                         event_name=f"sluice.{event_type}")
            record.body.string_value = event_type
            record.attributes.extend(self.attributes(row))
        return request.SerializeToString()

    def attributes(self, row: Sequence) -> list[KeyValue]:
        """Empty text, zero and an empty chain are left out, as in the JSONL line."""
        cache, out = self.cache, []
        for index, name, kind in self.fields:
            value = row[index]
            if kind == _FLAG:
                value = bool(value)
            elif not value:
                continue
            elif kind == _UNIQUE:
                out.append(_key_value(name, value))
                continue
            elif kind == _CHAIN:
                out.append(_key_value(name, _chain(value)))
                continue
            kv = cache.get((name, value))
            if kv is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                kv = cache[(name, value)] = _key_value(name, value)
            out.append(kv)
        return out


def _chain(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        return [text]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _any_value(value) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[_any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def _key_value(key: str, value) -> KeyValue:
    return KeyValue(key=key, value=_any_value(value))


# ---------------------------------------------------------------- sending

# Retried per the OTLP/HTTP specification (429, 502, 503, 504) and, as the collector's own
# trouble, any other 5xx; every other answer that is not 2xx is permanent.
_RETRY_STATUS = frozenset({429})


class OtlpClient:
    """POSTs serialized requests over one kept-alive connection."""

    def __init__(self, endpoint: Endpoint, headers: dict[str, str], *,
                 timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self.headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip",
                        "User-Agent": f"sluice/{__version__}", **headers}
        if endpoint.auth:
            self.headers.setdefault("Authorization", endpoint.auth)
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            if self.endpoint.scheme == "https":
                self.conn = http.client.HTTPSConnection(
                    self.endpoint.host, self.endpoint.port, timeout=self.timeout,
                    context=ssl.create_default_context())
            else:
                self.conn = http.client.HTTPConnection(self.endpoint.host, self.endpoint.port,
                                                       timeout=self.timeout)
        return self.conn

    def post(self, body: bytes) -> None:
        """Deliver one request; DeliveryFailed (permanent or not) says why, secret-free."""
        data = gzip.compress(body, compresslevel=1)  # ~100x smaller; level 1 costs least
        try:
            conn = self._connection()
            conn.request("POST", self.endpoint.target, body=data, headers=self.headers)
            response = conn.getresponse()
            response.read()  # the connection is reused only once the body is consumed
            status, retry_after = response.status, response.getheader("Retry-After")
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException) as err:
            self.close()
            raise DeliveryFailed(describe(err)) from None
        if 200 <= status < 300:
            return
        if status in _RETRY_STATUS or status >= 500:
            raise DeliveryFailed(f"HTTP {status}", retry_after=_seconds(retry_after))
        raise DeliveryFailed(f"HTTP {status}", permanent=True)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header else None
    except ValueError:
        return None  # an HTTP date: the usual backoff is as good


def describe(err: BaseException) -> str:
    """A network failure in words that hold no URL, address path or header."""
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "no answer in time"
    if isinstance(err, socket.gaierror):
        return "host name not resolved"
    if isinstance(err, ssl.SSLCertVerificationError):
        return "TLS certificate not trusted"
    if isinstance(err, ssl.SSLError):
        return "TLS error"
    if isinstance(err, ConnectionError):
        return "connection lost"
    if isinstance(err, http.client.HTTPException):
        return f"bad HTTP answer ({type(err).__name__})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return type(err).__name__
