"""DNS messages as bytes: a strict query parser and the small replies the proxy makes itself.

Queries are parsed by hand because every query takes this path, cached or not, and a full
dnspython parse costs ten times as much; the common shape is first only measured
(simple_question), so that a cache hit finds its answer by the question's bytes and never
makes the name text. Answers from the upstream are parsed by dnspython
(pipeline.dns.answers) once, when they arrive. Everything here takes and returns bytes.
"""

from __future__ import annotations

import dataclasses
import re
import struct

HEADER = struct.Struct("!HHHHHH")
_FLAGS_COUNTS = struct.Struct("!2xHHHHH")
_OPT_RECORD = struct.Struct("!BHHIH")  # root name, type, payload size, ttl, rdlength
_TYPE_CLASS = struct.Struct("!HH")
_RECORD_TAIL = struct.Struct("!HHIH")  # type, class, ttl, rdlength

MAX_QUERY_BYTES = 4096   # a real query is a few hundred bytes; more is abuse
MIN_UDP_PAYLOAD = 512    # what a client without EDNS can take (RFC 1035)
MAX_NAME_BYTES = 255

FLAG_QR = 0x8000
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
OPCODE_QUERY = 0
TYPE_OPT = 41
TYPE_PTR = 12

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

_PLAIN_LABEL = re.compile(rb"[A-Za-z0-9_-]*")
_SPECIAL = frozenset(b'."\\()@;$')


class Malformed(ValueError):
    """A packet that is not a well-formed DNS query; the text says why (for the log)."""


@dataclasses.dataclass(slots=True)
class Query:
    wire: bytes
    id: int
    flags: int
    question: bytes     # the question section as received ("" when there is none)
    qname: str          # presentation form with the trailing dot, case as received (as the
                        # cached answer's query had it, from known_query: `name` lowercases)
    qtype: int
    qclass: int
    udp_limit: int      # the largest UDP answer the client takes

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def name(self) -> str:
        """The name rules are matched on: lowercased, trailing dot removed."""
        return self.qname.rstrip(".").lower()

    @property
    def cache_key(self) -> bytes:
        return question_key(self.question) if self.question else b""


def question_key(question: bytes) -> bytes:
    """The response cache's key (reference §5.3) in wire form: the question's name bytes
    lowercased, its type and class as they are. The reference's `name.|TYPE|CLASS` text
    maps one to one onto it (presentation form escapes every byte but printable ASCII, and
    lowercases only A-Z, as bytes.lower() does; length bytes never reach 'A')."""
    return question[:-4].lower() + question[-4:]


def parse_query(data: bytes) -> Query:
    """Every byte accounted for: header, at most one question, then well-formed records."""
    if len(data) > MAX_QUERY_BYTES:
        raise Malformed(f"oversized query ({len(data)} bytes)")
    if len(data) < HEADER.size:
        raise Malformed("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & FLAG_QR:
        raise Malformed("a response where a query was expected")
    if qdcount > 1:
        raise Malformed("more than one question")
    question, qname, qtype, qclass, pos = b"", "", 0, 0, HEADER.size
    if qdcount:
        labels, pos = _read_question_name(data, pos)
        if pos + 4 > len(data):
            raise Malformed("question cut short")
        qtype, qclass = _TYPE_CLASS.unpack_from(data, pos)
        pos += 4
        question, qname = data[HEADER.size:pos], _name_text(labels)
    udp_limit = MIN_UDP_PAYLOAD
    for index in range(ancount + nscount + arcount):
        pos, rtype, rclass = _skip_record(data, pos)
        if rtype == TYPE_OPT and index >= ancount + nscount:
            udp_limit = max(MIN_UDP_PAYLOAD, rclass)  # OPT's class is the payload size
    if pos != len(data):
        raise Malformed("bytes after the last record")
    return Query(data, qid, flags, question, qname, qtype, qclass, udp_limit)


def simple_question(data: bytes) -> tuple[bytes, int] | None:
    """(question section, UDP limit) of the query nearly every stub sends: a standard query,
    one question with an uncompressed name, nothing more than one EDNS OPT record. It reads
    only label lengths, so a cache hit costs no name text. None for anything else, even when
    well formed: parse_query decides those."""
    if not HEADER.size < len(data) <= MAX_QUERY_BYTES:
        return None
    flags, qdcount, ancount, nscount, arcount = _FLAGS_COUNTS.unpack_from(data)
    if flags & 0xF800 or qdcount != 1 or ancount or nscount or arcount > 1:
        return None   # a response, another opcode, or more than a question and an OPT
    pos, end = HEADER.size, len(data)
    while pos < end and 0 < data[pos] <= 63:
        pos += 1 + data[pos]
    if pos >= end or data[pos] or pos - HEADER.size > MAX_NAME_BYTES:
        return None   # cut short, a pointer or extended label, or too long
    question_end = pos + 5
    if not arcount:
        return (data[HEADER.size:question_end], MIN_UDP_PAYLOAD) if question_end == end else None
    if question_end + _OPT_RECORD.size > end:
        return None
    root, rtype, payload, _, rdlength = _OPT_RECORD.unpack_from(data, question_end)
    if root or rtype != TYPE_OPT or question_end + _OPT_RECORD.size + rdlength != end:
        return None
    return data[HEADER.size:question_end], max(MIN_UDP_PAYLOAD, payload)


def known_query(data: bytes, question: bytes, qname: str, udp_limit: int) -> Query:
    """The Query of a simple_question whose name text is already known (a cached answer
    keeps it): what parse_query would give, without making the text again."""
    qid, flags = struct.unpack_from("!HH", data)
    qtype, qclass = _TYPE_CLASS.unpack_from(question, len(question) - 4)
    return Query(data, qid, flags, question, qname, qtype, qclass, udp_limit)


def _read_question_name(data: bytes, pos: int) -> tuple[list[bytes], int]:
    """Labels of an uncompressed name (nothing precedes the question to point back to)."""
    labels: list[bytes] = []
    total = 0
    while True:
        if pos >= len(data):
            raise Malformed("name cut short")
        length = data[pos]
        if length == 0:
            return labels, pos + 1
        if length > 63:
            raise Malformed("compressed or extended label in the question")
        total += length + 1
        if total > MAX_NAME_BYTES or pos + 1 + length > len(data):
            raise Malformed("name too long or cut short")
        labels.append(data[pos + 1:pos + 1 + length])
        pos += 1 + length


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        if pos >= len(data):
            raise Malformed("record name cut short")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(data):
                raise Malformed("record name cut short")
            return pos + 2
        if length > 63:
            raise Malformed("unknown label type")
        pos += 1 + length


def _skip_record(data: bytes, pos: int) -> tuple[int, int, int]:
    pos = _skip_name(data, pos)
    if pos + _RECORD_TAIL.size > len(data):
        raise Malformed("record cut short")
    rtype, rclass, _, rdlength = _RECORD_TAIL.unpack_from(data, pos)
    pos += _RECORD_TAIL.size + rdlength
    if pos > len(data):
        raise Malformed("record data cut short")
    return pos, rtype, rclass


def _name_text(labels: list[bytes]) -> str:
    return "".join(_label_text(label) + "." for label in labels) or "."


def _label_text(label: bytes) -> str:
    if _PLAIN_LABEL.fullmatch(label):
        return label.decode("ascii")
    return "".join(f"\\{b:03d}" if b in _SPECIAL or not 0x20 < b < 0x7F else chr(b)
                   for b in label)


# ---------------------------------------------------------------- answers as bytes


def with_id(wire: bytes, qid: int) -> bytes:
    return qid.to_bytes(2, "big") + wire[2:]


def rcode_of(wire: bytes) -> int:
    return wire[3] & 0xF


def is_truncated(wire: bytes) -> bool:
    return bool(int.from_bytes(wire[2:4], "big") & FLAG_TC)


def answers_question(wire: bytes, qid: int, question: bytes) -> bool:
    """The answer is to our question: same id, a response, the same question (names compare
    without case, as DNS does)."""
    if len(wire) < HEADER.size + len(question):
        return False
    rid, flags, qdcount = struct.unpack_from("!HHH", wire)
    if rid != qid or not flags & FLAG_QR or qdcount != (1 if question else 0):
        return False
    echoed = wire[HEADER.size:HEADER.size + len(question)]
    return echoed.lower() == question.lower()


def reply(query: Query, rcode: int) -> bytes:
    """An answer the proxy makes itself (REFUSED, SERVFAIL, NOTIMP): the question echoed."""
    flags = FLAG_QR | (query.flags & (0x7800 | FLAG_RD)) | FLAG_RA | rcode
    return HEADER.pack(query.id, flags, 1 if query.question else 0, 0, 0, 0) + query.question


def fit_for_udp(wire: bytes, query: Query) -> bytes:
    """An answer larger than the client takes over UDP becomes the question with TC set,
    and the client asks again over TCP (RFC 1035 §4.2.1, RFC 7766)."""
    if len(wire) <= query.udp_limit:
        return wire
    flags = struct.unpack_from("!H", wire, 2)[0] | FLAG_TC
    return HEADER.pack(query.id, flags, 1 if query.question else 0, 0, 0, 0) + query.question
