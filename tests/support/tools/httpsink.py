"""A local HTTP sink for webhook tests: it records every POST and can fail or stall first.

In a test:       with HttpSink(fail_first=2) as sink: ... sink.url, sink.requests
In a namespace:  python -m tests.support.tools.httpsink 127.0.0.1 8099 --record FILE
                     [--fail-first N]   (prints "ready"; appends one JSON line per request
                 to FILE, which posts(FILE) and delivered(FILE) read back)

Each request is recorded as {"path", "headers", "body", "status"}: the first `fail_first`
requests are answered `fail_status` (with a Location header when `redirect_to` is set), the
others 200; `delay` stalls every answer.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HttpSink:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, fail_first: int = 0,
                 fail_status: int = 500, redirect_to: str = "", delay: float = 0.0,
                 record: Path | None = None) -> None:
        self.fail_first, self.fail_status, self.delay = fail_first, fail_status, delay
        self.redirect_to = redirect_to
        self.record = record
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}/hook/secret-path"

    def take(self, path: str, headers: dict, body: bytes) -> int:
        """Record one request; the status to answer it with."""
        with self.lock:
            status = self.fail_status if len(self.requests) < self.fail_first else 200
            entry = {"path": path, "headers": headers, "body": json.loads(body or b"null"),
                     "status": status}
            self.requests.append(entry)
            if self.record:
                with open(self.record, "a") as out:
                    out.write(json.dumps(entry) + "\n")
        return status

    def delivered(self) -> list[dict]:
        """Bodies of the requests answered 200."""
        with self.lock:
            return [r["body"] for r in self.requests if r["status"] == 200]

    def __enter__(self) -> HttpSink:
        threading.Thread(target=self.server.serve_forever, name="http-sink", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def posts(record: Path) -> list[dict]:
    """The requests a sink run with --record wrote to record, in order."""
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def delivered(record: Path) -> list[dict]:
    """Bodies of the recorded requests answered 200."""
    return [p["body"] for p in posts(record) if p["status"] == 200]


def _handler(sink: HttpSink):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = sink.take(self.path, dict(self.headers), body)
            time.sleep(sink.delay)
            self.send_response(status)
            if status != 200 and sink.redirect_to:
                self.send_header("Location", sink.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass  # the test reads sink.requests, not stderr

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args()
    sink = HttpSink(args.host, args.port, fail_first=args.fail_first, record=args.record)
    print("ready", flush=True)
    sink.server.serve_forever()


if __name__ == "__main__":
    main()
