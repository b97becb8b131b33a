"""Test traffic generator run inside a namespace: `python -m tests.support.tools.netclient ...`.

Names itself (prctl) so tests can assert the process name the kernel recorded, and prints
one JSON line with its pid and what happened.
"""

import argparse
import ctypes
import json
import os
import socket
import time

PR_SET_NAME = 15


def set_name(name: str) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def tcp(host: str, port: int, timeout: float) -> dict:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    start = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            sock.sendall(b"ping\n")
            data = sock.recv(64)
            return {"ok": True, "reply": data.decode(), "seconds": time.monotonic() - start}
        except OSError as err:
            return {"ok": False, "error": str(err), "seconds": time.monotonic() - start}


def session(host: str, port: int, timeout: float) -> None:
    """One connection kept open: a ping per line read on stdin, a JSON result line each."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        print(json.dumps({"pid": os.getpid(), "ok": True}), flush=True)
        for _ in iter(input, "quit"):
            try:
                sock.sendall(b"ping\n")
                reply = sock.recv(64).decode()
                print(json.dumps({"ok": bool(reply), "reply": reply}), flush=True)
            except OSError as err:
                print(json.dumps({"ok": False, "error": str(err)}), flush=True)


def udp(host: str, port: int, count: int, spread: int) -> dict:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sent = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            try:
                sock.sendto(b"x", (host, port + (i % spread)))
                sent += 1
            except OSError:
                pass
    return {"ok": True, "sent": sent}


def raw(host: str, proto: int, count: int) -> dict:
    """ICMP echo (proto 1) or a bare GRE/other-protocol packet."""
    payload = b"\x08\x00\xf7\xff\x00\x00\x00\x00" if proto == 1 else b"\x00\x00\x08\x00"
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) as sock:
        for _ in range(count):
            try:
                sock.sendto(payload, (host, 0))
                sent += 1
            except OSError:
                pass
    return {"ok": True, "sent": sent}


def frame(host: str, port: int, interface: str, tags: list[int], count: int) -> dict:
    """Hand-built Ethernet frames carrying a TCP SYN behind 802.1Q/802.1ad tags."""
    import struct

    src_mac = bytes.fromhex(open(f"/sys/class/net/{interface}/address").read().strip()
                            .replace(":", ""))
    src_ip = socket.inet_aton("0.0.0.0")  # the classifier judges destinations only
    dst_ip = socket.inet_aton(host)
    tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src_ip, dst_ip)
    checksum = 0
    for (word,) in struct.iter_unpack("!H", header):
        checksum += word
    checksum = (checksum & 0xFFFF) + (checksum >> 16)
    header = header[:10] + struct.pack("!H", ~checksum & 0xFFFF) + header[12:]
    ethertypes = [0x88A8, 0x8100][-len(tags):]  # one tag: 802.1Q; two: 802.1ad outside
    eth = b"\xff" * 6 + src_mac
    for ethertype, vid in zip(ethertypes, tags, strict=False):
        eth += struct.pack("!HH", ethertype, vid)
    eth += struct.pack("!H", 0x0800)
    dropped = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((interface, 0))
        for _ in range(count):
            try:
                sock.send(eth + header + tcp)
            except OSError:  # ENOBUFS: egress TC dropped the frame
                dropped += 1
    return {"ok": dropped == 0, "sent": count, "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["tcp", "udp", "raw", "frame", "session"])
    parser.add_argument("host")
    parser.add_argument("port", type=int, help="port, or protocol number for raw")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--spread", type=int, default=1, help="udp: cycle over this many ports")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--name", default="sl-client")
    parser.add_argument("--interface", help="frame: the interface to send on")
    parser.add_argument("--vlan", type=int, action="append", default=[],
                        help="frame: VLAN ids, outermost first (two = QinQ)")
    args = parser.parse_args()
    set_name(args.name)
    if args.mode == "session":
        return session(args.host, args.port, args.timeout)
    if args.mode == "tcp":
        result = tcp(args.host, args.port, args.timeout)
    elif args.mode == "udp":
        result = udp(args.host, args.port, args.count, args.spread)
    elif args.mode == "frame":
        result = frame(args.host, args.port, args.interface, args.vlan, args.count)
    else:
        result = raw(args.host, args.port, args.count)
    print(json.dumps({"pid": os.getpid(), **result}), flush=True)


if __name__ == "__main__":
    main()
