"""Throw random and wrong-shaped input at every inbox of a running pipeline.

    python -m tests.support.tools.fuzzer RUN_DIR --seed N --per-inbox N [--dns 127.0.0.1:53]

Run inside the pipeline's network namespace (the DNS proxy listens there; the ZeroMQ inboxes
are ipc sockets under RUN_DIR). Each inbox gets --per-inbox messages, a seeded mix of:
random bytes, random msgpack, unknown and misplaced kinds, wrong versions, the inbox's own
kinds with one field of a good record replaced by a random value, random arrays as records,
multipart messages, records valid in every field but random in value (taken and handled),
and, for the PULL inboxes, one frame over the size limit (its sender is dropped). The REP
inbox is asked through a DEALER and every request must get an answer. With --dns, random
datagrams and TCP streams go to the DNS proxy too. Prints one JSON object: what was sent
where, and the REP answers received.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import time
import typing
from pathlib import Path

import msgpack
import msgspec
import zmq

from pipeline import messages, wire
from pipeline.topology import STAGES, inbox_address

INBOXES = {inbox.name: inbox for wiring in STAGES.values() for inbox in wiring.inboxes}
EDGY_INTS = [-1, 0, 1, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
             (1 << 64) - 1]
EDGY_TEXT = ["", "999.999.1.1", "::ffff:zzzz", "10.0.0.1/24", "fe80::1%lo", "x" * 5000,
             "\x00", "drop_table", "connection_blocked", "enforce", "\u2028<&>"]


class Random:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def value(self, depth: int = 0):
        """A random msgpack value."""
        choice = self.rng.randrange(9 if depth < 3 else 6)
        if choice == 0:
            return None
        if choice == 1:
            return self.rng.random() < 0.5
        if choice == 2:
            return self.rng.choice(EDGY_INTS + [self.rng.randrange(-1 << 63, 1 << 64)])
        if choice == 3:
            return self.rng.choice(EDGY_TEXT + [self.text()])
        if choice == 4:
            return self.rng.random() * 10 ** self.rng.randrange(-5, 20)
        if choice == 5:
            return self.rng.randbytes(self.rng.randrange(20))
        if choice in (6, 7):
            return [self.value(depth + 1) for _ in range(self.rng.randrange(5))]
        return {self.text(8): self.value(depth + 1) for _ in range(self.rng.randrange(4))}

    def text(self, size: int = 20) -> str:
        return "".join(chr(self.rng.choice([self.rng.randrange(32, 127),
                                            self.rng.randrange(0x80, 0x3000)]))
                       for _ in range(self.rng.randrange(size)))

    def address(self) -> str:
        if self.rng.random() < 0.5:
            return ".".join(str(self.rng.randrange(256)) for _ in range(4))
        return ":".join(f"{self.rng.randrange(0x10000):x}" for _ in range(8))

    def in_range(self, cls) -> list:
        """A record of cls valid in every field, random in value."""
        hints = typing.get_type_hints(cls)
        limits = wire.limits(cls)
        values = []
        for field in msgspec.structs.fields(cls):
            hint, limit = wire.plain_type(hints[field.name]), limits.get(field.name)
            if hint is bool:
                values.append(self.rng.random() < 0.5)
            elif limit is not None and limit.choices:
                values.append(self.rng.choice(limit.choices))
            elif hint is int:
                values.append(self.rng.randrange(limit.lo, limit.hi + 1) if limit else 0)
            elif limit is not None and limit.address:
                many = hint is not str
                values.append([self.address() for _ in range(self.rng.randrange(4))] if many
                              else self.address())
            elif hint == list[str]:
                values.append([self.text(30) for _ in range(self.rng.randrange(4))])
            else:
                values.append(self.text(min(30, limit.max_len if limit else 30)))
        return values

    def frame(self, inbox: str) -> list[bytes]:
        """One message for an inbox: a list of frames (more than one: multipart)."""
        kinds = INBOXES[inbox].kinds
        choice = self.rng.randrange(9)
        if choice == 0:
            return [self.rng.randbytes(self.rng.randrange(300))]
        if choice == 1:
            return [msgpack.packb(self.value())]
        if choice == 2:  # a kind this inbox does not take, or none at all
            kind = self.rng.choice([k for k in wire.REGISTRY if k not in kinds] + ["nope", 7])
            return [msgpack.packb({"kind": kind, "v": 1, "records": []})]
        kind = self.rng.choice(kinds)
        cls = wire.REGISTRY[kind]
        if choice == 3:  # a good record with one field replaced
            record = self.in_range(cls)
            record[self.rng.randrange(len(record))] = self.value()
            return [msgpack.packb({"kind": kind, "v": cls.VERSION, "records": [record]})]
        if choice == 4:
            return [msgpack.packb({"kind": kind, "v": cls.VERSION,
                                   "records": [self.value() for _ in range(3)]})]
        if choice == 5:
            return [self.frame(inbox)[0] for _ in range(self.rng.randrange(2, 4))]
        if choice == 6:
            return [msgpack.packb({"kind": kind, "v": self.value(), "records": []})]
        if choice == 7:  # valid in every field: the stage handles it
            return [msgpack.packb({"kind": kind, "v": cls.VERSION,
                                   "records": [self.in_range(cls)
                                               for _ in range(self.rng.randrange(1, 4))]})]
        return [msgpack.packb({"kind": kind, "v": cls.VERSION, "records": self.value()})]


def fuzz_pull(ctx: zmq.Context, run_dir: Path, inbox: str, rnd: Random, count: int) -> dict:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.connect(inbox_address(run_dir, inbox))
    multipart = 0
    for _ in range(count):
        frames = rnd.frame(inbox)
        multipart += len(frames) > 1
        sock.send_multipart(frames)
    sock.close()
    big = ctx.socket(zmq.PUSH)  # libzmq drops the sender of a frame over the limit
    big.setsockopt(zmq.LINGER, 2000)
    big.connect(inbox_address(run_dir, inbox))
    big.send(b"\x00" * (messages.MAX_FRAME + 1), zmq.NOBLOCK)
    big.close()
    return {"messages": count + 1, "multipart": multipart, "oversized": 1}


def fuzz_rep(ctx: zmq.Context, run_dir: Path, inbox: str, rnd: Random, count: int) -> dict:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(inbox_address(run_dir, inbox))
    answered = rejected = 0
    for _ in range(count):
        sock.send_multipart([b""] + rnd.frame(inbox))
        reply = sock.recv_multipart()  # raises on a timeout: every request is answered
        answered += 1
        rejected += reply == [b"", b""]
    sock.close()
    return {"messages": count, "answered": answered, "rejected": rejected}


def fuzz_dns(host: str, port: int, rnd: Random, count: int) -> dict:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for _ in range(count):
            udp.sendto(rnd.rng.randbytes(rnd.rng.randrange(600)), (host, port))
    streams = 0
    for _ in range(max(1, count // 10)):
        try:
            with socket.create_connection((host, port), timeout=2) as tcp:
                for _ in range(rnd.rng.randrange(1, 4)):
                    body = rnd.rng.randbytes(rnd.rng.randrange(300))
                    length = rnd.rng.choice([len(body), len(body) + 7, 0xFFFF])
                    tcp.sendall(struct.pack("!H", length) + body)
                streams += 1
        except OSError:
            pass
    return {"udp": count, "tcp_streams": streams}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per-inbox", type=int, default=200)
    parser.add_argument("--dns", default="")
    args = parser.parse_args()
    rnd = Random(args.seed)
    ctx = zmq.Context()
    sent = {}
    for name, inbox in INBOXES.items():
        fuzz = fuzz_rep if inbox.pattern == "rep" else fuzz_pull
        sent[name] = fuzz(ctx, args.run_dir, name, rnd, args.per_inbox)
    if args.dns:
        host, port = args.dns.rsplit(":", 1)
        sent["dns_proxy"] = fuzz_dns(host, int(port), rnd, args.per_inbox)
    ctx.term()
    time.sleep(0.2)
    print(json.dumps(sent))


if __name__ == "__main__":
    main()
