"""Reverse lookups are forward-confirmed: a PTR name counts only if it resolves back."""

import select

from pipeline.names.reverse import NAMED, NO_NAME, UNCONFIRMED, ReverseResolver
from tests.support.tools.ptrserver import PtrServer


def lookups(server, ips):
    resolver = ReverseResolver("127.0.0.1", port=server.port, timeout=2)
    resolver.start()
    try:
        resolver.submit(ips)
        done = {}
        while len(done) < len(ips):
            assert select.select([resolver.fd], [], [], 5)[0], "lookups never finished"
            done.update({lookup.ip: lookup for lookup in resolver.finished()})
        return done
    finally:
        resolver.close()


def test_named_unconfirmed_and_unnamed_addresses():
    names = {"192.0.2.10": "web.allowed.example.", "2001:db8::10": "web6.allowed.example."}
    spoofed = {"192.0.2.66": "web.allowed.example."}
    with PtrServer(names, spoofed=spoofed) as server:
        done = lookups(server, ["192.0.2.10", "2001:db8::10", "192.0.2.66", "192.0.2.99"])
    assert (done["192.0.2.10"].outcome, done["192.0.2.10"].answer) == (
        NAMED, "web.allowed.example.")
    assert done["2001:db8::10"].outcome == NAMED
    assert (done["192.0.2.66"].outcome, done["192.0.2.66"].answer) == (
        UNCONFIRMED, "web.allowed.example.")
    assert done["192.0.2.99"].outcome == NO_NAME
