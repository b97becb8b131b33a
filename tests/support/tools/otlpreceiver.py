"""A local OTLP/HTTP logs receiver: decodes each request with the opentelemetry-proto package.

In a test:       with OtlpReceiver() as collector: ... collector.endpoint, collector.records()
                 collector.answer = 503 (every request answered so, nothing kept), .down() and
                 .up() (the port closed, then listening again)
In a namespace:  python -m tests.support.tools.otlpreceiver 127.0.0.1 4318 --record FILE
                 (prints "ready"; appends one JSON line per log record to FILE)

A record is {"body", "time", "severity", "event_name", "attributes", "resource", "headers"}:
attributes decoded to Python values (arrays to lists), resource attributes likewise.
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest, ExportLogsServiceResponse)


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def decode(body: bytes, headers: dict) -> list[dict]:
    if headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    request = ExportLogsServiceRequest.FromString(body)
    records = []
    for resource_logs in request.resource_logs:
        resource = {kv.key: value_of(kv.value) for kv in resource_logs.resource.attributes}
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                records.append({
                    "body": value_of(record.body), "time": record.time_unix_nano,
                    "severity": record.severity_text, "event_name": record.event_name,
                    "scope": scope_logs.scope.name,
                    "attributes": {kv.key: value_of(kv.value) for kv in record.attributes},
                    "resource": resource, "headers": headers})
    return records


class OtlpReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 record: Path | None = None) -> None:
        self.host, self.record = host, record
        self.answer = 200
        self.delay = 0.0  # seconds before each answer: a slow collector
        self.arrived = 0  # requests received, answered or not yet
        self.requests: list[tuple[int, str, dict]] = []  # (status, path, headers)
        self.kept: list[dict] = []
        self.connections: set = set()
        self.lock = threading.Lock()
        self.server = self._serve(port)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"

    def _serve(self, port: int) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer((self.host, port), _handler(self))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True).start()
        return server

    def take(self, path: str, headers: dict, body: bytes) -> int:
        with self.lock:
            status = self.answer
            self.requests.append((status, path, headers))
            if status == 200:
                records = decode(body, headers)
                self.kept += records
                if self.record:
                    with open(self.record, "a") as out:
                        out.writelines(json.dumps(r) + "\n" for r in records)
        return status

    def records(self) -> list[dict]:
        with self.lock:
            return list(self.kept)

    def down(self) -> None:
        """Stop listening and cut the kept-alive connections, as a collector that died."""
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.connections.clear()

    def up(self) -> None:
        self.server = self._serve(self.port)

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def _handler(receiver: OtlpReceiver):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

        def setup(self) -> None:
            super().setup()
            with receiver.lock:
                receiver.connections.add(self.connection)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with receiver.lock:
                receiver.arrived += 1
            time.sleep(receiver.delay)
            status = receiver.take(self.path, dict(self.headers), body)
            answer = ExportLogsServiceResponse().SerializeToString() if status == 200 else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args()
    OtlpReceiver(args.host, args.port, record=args.record)
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
