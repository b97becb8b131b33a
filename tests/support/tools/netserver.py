"""Test services run inside a namespace: TCP echo on each given port (v4 and v6), UDP sink.

`python -m tests.support.tools.netserver 80 443 ...`; prints "ready" once listening.
"""

import selectors
import socket
import sys


def main() -> None:
    sel = selectors.DefaultSelector()
    for port in map(int, sys.argv[1:]):
        for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind((addr, port))
            listener.listen(512)
            listener.setblocking(False)
            sel.register(listener, selectors.EVENT_READ, "accept")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "accept":
                try:
                    conn, _ = key.fileobj.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "echo")
            else:
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if data:
                    try:
                        key.fileobj.send(b"pong\n")
                    except OSError:
                        pass
                else:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()


if __name__ == "__main__":
    main()
