"""msgpack framing shared by every message kind, and the one validation at each inbox.

A message is one msgpack map {"kind": K, "v": N, "records": [[field, ...], ...]}: a batch of
records of one kind, each a positional array in the order of its class's fields. The
contract for each kind is schemas/<kind>.json; the classes registered here follow it (a test
keeps them in step, value ranges included). Never pickle.

A record is accepted only when every field has its type *and* its range: each field's type
carries a Limit (U16, ADDRESS, NAMES, ...), so ports are 0-65535, pids and counts fit their
C types, addresses parse, strings and lists are bounded and enums are known. Stage logic
never sees a value outside those ranges.

Records are msgspec Structs: a message is decoded and checked in one pass in C (types,
ranges, lengths, enums; hundreds of thousands of records a second per stage), then its
address fields are parsed. Only a message that fails takes the slow path, which decodes it
record by record to keep the good ones and say why each bad one was skipped. Fields with
defaults (audit records' optional ones) may be left off the end of a record.
"""

from __future__ import annotations

import dataclasses
import socket
import typing
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal, Union

import msgpack
import msgspec

from .errors import MessageError

MAX_FRAME = 16 * 1024 * 1024
_parse, _V4, _V6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6


def is_address(text: str) -> bool:
    """IPv4 or IPv6 address text (no zone, no CIDR): what every address field holds. Each
    stage checks two a record at its inbox, so the families are tried without a loop."""
    try:
        _parse(_V4, text)
        return True
    except (OSError, ValueError):  # ValueError: an embedded NUL
        pass
    try:
        _parse(_V6, text)
        return True
    except (OSError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class Limit:
    """The values a wire field may take, beyond its type (mirrored in its schema)."""

    lo: int | None = None          # integers: inclusive range
    hi: int | None = None
    choices: tuple = ()            # a known enum
    max_len: int | None = None     # strings: characters; lists: items
    item_len: int | None = None    # list[str]: characters of each item
    address: bool = False          # the string (each item of a list) is an IP address
    empty: bool = False            # address: "" allowed too

    def problem(self, value: Any) -> str | None:
        """Why value is out of range, or None (value already has the field's type)."""
        if self.choices and value not in self.choices:
            return f"is not one of {', '.join(map(str, self.choices))}"
        if self.lo is not None and value < self.lo or self.hi is not None and value > self.hi:
            return f"is outside {self.lo}-{self.hi}"
        if self.max_len is not None and len(value) > self.max_len:
            return f"is longer than {self.max_len}"
        items = value if isinstance(value, list) else [value]
        if self.item_len is not None and any(len(x) > self.item_len for x in items):
            return f"has an item longer than {self.item_len}"
        if self.address and not all((self.empty and x == "") or is_address(x) for x in items):
            return "is not an IP address"
        return None

    def expression(self, v: str, names: dict[str, Any]) -> str:
        """The same test as a Python expression over v (for the generated fast check)."""
        parts = []
        if self.choices:
            choices = f"_choices_{len(names)}"
            names[choices] = frozenset(self.choices)
            parts.append(f"{v} in {choices}")
        if self.lo is not None:
            parts.append(f"{self.lo} <= {v}")
        if self.hi is not None:
            parts.append(f"{v} <= {self.hi}")
        if self.max_len is not None:
            parts.append(f"len({v}) <= {self.max_len}")
        if self.item_len is not None:
            parts.append(f"all(len(x) <= {self.item_len} for x in {v})")
        if self.address:
            item = "x" if self.item_len is not None else v
            one = f"({item} == '' or is_address({item}))" if self.empty else f"is_address({item})"
            parts.append(f"all({one} for x in {v})" if item == "x" else one)
        return " and ".join(parts) or "True"


def limited(base: Any, limit: Limit) -> Any:
    """The type of a wire field: base within limit. msgspec checks all of it as it decodes
    but the address test, which WireRecord's decode makes right after."""
    meta: dict[str, Any] = {}
    if limit.lo is not None:
        meta["ge"] = limit.lo
    if limit.hi is not None:
        meta["le"] = limit.hi
    if limit.max_len is not None:
        meta["max_length"] = limit.max_len
    if limit.choices:
        base = Literal[limit.choices]
    if limit.item_len is not None:
        base = list[Annotated[str, msgspec.Meta(max_length=limit.item_len)]]
    return Annotated[base, msgspec.Meta(**meta), limit] if meta else Annotated[base, limit]


U8 = limited(int, Limit(0, 0xFF))
U16 = limited(int, Limit(0, 0xFFFF))
U32 = limited(int, Limit(0, 0xFFFF_FFFF))
I64 = limited(int, Limit(0, (1 << 63) - 1))  # nanosecond timestamps and counts: what SQL stores
IP_VERSION = limited(int, Limit(choices=(4, 6)))
ADDRESS = limited(str, Limit(address=True))
ADDRESS_OR_EMPTY = limited(str, Limit(address=True, empty=True))
ADDRESSES = limited(list[str], Limit(max_len=4096, item_len=45, address=True))  # < 4096 in 64 KiB
NAME = limited(str, Limit(max_len=1024))  # a 255-byte DNS name, odd bytes written as \DDD
NAMES = limited(list[str], Limit(max_len=32, item_len=1024))  # CNAME chains (dns/cnames.py)
SHORT = limited(str, Limit(max_len=64))    # protocol names, tags, ids
COMM = limited(str, Limit(max_len=16))     # the kernel's TASK_COMM_LEN
PROCESS = limited(str, Limit(max_len=256))  # a process name (imported logs may hold longer)
TEXT = limited(str, Limit(max_len=4096))   # free text (error messages)
EVENT_ID = limited(str, Limit(max_len=128))
HOST = limited(str, Limit(max_len=255))
MODE = limited(str, Limit(choices=("audit", "enforce")))


class WireRecord(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True):
    """Base of every record that travels: a positional array on the wire."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1
    _checks: ClassVar[tuple[tuple[str, Any, Limit | None], ...]]
    _addresses: ClassVar[Any]  # generated: the address fields of a record parse

    def to_wire(self) -> tuple:
        return msgspec.structs.astuple(self)

    @classmethod
    def from_wire(cls, values: Any) -> typing.Self:
        """One record from its positional array (the slow path, recordings and imports)."""
        reason, value = cls.problem_of(values)
        if reason:
            raise MessageError(f"{cls.KIND}: {reason}", value)
        return cls(*values)

    @classmethod
    def problem_of(cls, values: Any) -> tuple[str, str]:
        """(why values are not a record of this kind, the offending value shown short);
        ("", "") if they are one."""
        checks = cls._checks
        required = sum(f.required for f in msgspec.structs.fields(cls))
        if type(values) not in (list, tuple) or not required <= len(values) <= len(checks):
            return f"expected an array of {len(checks)} fields", ""
        for value, (name, check, limit) in zip(values, checks, strict=False):
            if not check(value):
                return f"field {name} has a bad type", f"{value!r:.40}"
            why = limit.problem(value) if limit is not None else None
            if why:
                return f"field {name} {why}", f"{value!r:.40}"
        return "", ""

    def problem(self) -> str | None:
        """Why this record could not travel (a value out of range), or None."""
        return self.problem_of(list(self.to_wire()))[0] or None


def _check_for(annotation: Any):
    if annotation is bool:
        return lambda v: type(v) is bool
    if annotation is int:
        return lambda v: type(v) is int
    if annotation is str:
        return lambda v: type(v) is str
    if annotation is float:
        return lambda v: type(v) in (float, int)
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (str,):
        return lambda v: type(v) is list and all(type(x) is str for x in v)
    raise TypeError(f"unsupported wire field type {annotation!r}")


REGISTRY: dict[str, type[WireRecord]] = {}
_MESSAGES: dict[str, type] = {}  # kind -> the Struct of a whole message of that kind
_RECORD_OF: dict[type, type[WireRecord]] = {}  # that Struct -> the record class
_decoder: msgspec.msgpack.Decoder | None = None
_encoder = msgspec.msgpack.Encoder()


R = typing.TypeVar("R", bound=type[WireRecord])


def register(cls: R) -> R:
    """Class decorator: index a WireRecord by its KIND and prepare its checks."""
    global _decoder
    hints = typing.get_type_hints(cls)
    extras = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in msgspec.structs.fields(cls)]
    limits_ = [_limit_of(extras[name]) for name in names]
    cls._checks = tuple((name, _check_for(plain_type(hints[name])), limit)
                        for name, limit in zip(names, limits_, strict=True))
    tests = []
    for name, limit in zip(names, limits_, strict=True):
        if limit is not None and limit.address:
            one = "(x == '' or is_address(x))" if limit.empty else "is_address(x)"
            tests.append(f"all({one} for x in r.{name})" if limit.item_len is not None
                         else one.replace("x", f"r.{name}"))
    cls._addresses = eval(f"lambda r: {' and '.join(tests) or 'True'}",
                          {"is_address": is_address})
    REGISTRY[cls.KIND] = cls
    message = msgspec.defstruct(
        f"{cls.__name__}Message",
        [("v", Literal[cls.VERSION]), ("records", list.__class_getitem__(cls))],
        tag_field="kind", tag=cls.KIND)
    _MESSAGES[cls.KIND], _RECORD_OF[message] = message, cls
    _decoder = None  # built again, with this kind, at the next decode
    return cls


def plain_type(hint: Any) -> Any:
    """The Python type a field holds (a Literal of choices holds their type)."""
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    if typing.get_origin(hint) is list:
        return list[str]
    return hint


def _limit_of(annotation: Any) -> Limit | None:
    if typing.get_origin(annotation) is Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, Limit)), None)
    return None


def limits(cls) -> dict[str, Limit]:
    """Each field's Limit (the schema test compares them with schemas/<kind>.json)."""
    return {name: limit for name, _, limit in cls._checks if limit is not None}


def encode(records: Iterable[WireRecord], kind: str | None = None) -> bytes:
    records = list(records)
    if kind is None:
        kind = records[0].KIND
    cls = REGISTRY[kind]
    return _encoder.encode({"kind": kind, "v": cls.VERSION, "records": records})


def decode_envelope(frame: bytes) -> tuple[str, list]:
    """Return (kind, raw record arrays); MessageError if the frame is not a sluice message."""
    if len(frame) > MAX_FRAME:
        raise MessageError(f"frame larger than {MAX_FRAME} bytes", str(len(frame)))
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as err:  # noqa: BLE001 - msgpack raises several unrelated types for garbage
        raise MessageError("not msgpack", type(err).__name__) from None
    if type(message) is not dict:
        raise MessageError("message is not a map")
    kind = message.get("kind")
    cls = REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(kind, str):
        raise MessageError("unknown kind", f"{kind!r:.40}")
    if message.get("v") != cls.VERSION:
        raise MessageError(f"{kind}: unsupported version", f"{message.get('v')!r:.20}")
    records = message.get("records")
    if type(records) is not list:
        raise MessageError(f"{kind}: records is not an array")
    return kind, records


def decode_records(frame: bytes) -> tuple[str, list, list[MessageError]]:
    """Decode a frame into (kind, good records, why each bad record was skipped)."""
    global _decoder
    if len(frame) > MAX_FRAME:
        raise MessageError(f"frame larger than {MAX_FRAME} bytes", str(len(frame)))
    if _decoder is None:
        _decoder = msgspec.msgpack.Decoder(
            Union[tuple(_MESSAGES.values())])  # noqa: UP007 (built from the registry)
    try:
        message = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _decode_one_by_one(frame)
    cls = _RECORD_OF[type(message)]
    records = message.records
    if all(map(cls._addresses, records)):
        return cls.KIND, records, []
    good = [r for r in records if cls._addresses(r)]
    bad = [MessageError(f"{cls.KIND}: {r.problem()}") for r in records if not cls._addresses(r)]
    return cls.KIND, good, bad


def _decode_one_by_one(frame: bytes) -> tuple[str, list, list[MessageError]]:
    kind, raw_records = decode_envelope(frame)
    cls = REGISTRY[kind]
    good, bad = [], []
    for values in raw_records:
        try:
            good.append(cls.from_wire(values))
        except MessageError as err:
            bad.append(err)
    return kind, good, bad


def decode(frame: bytes) -> tuple[str, list, int]:
    """Decode a frame into (kind, good records, count of bad records skipped)."""
    kind, good, bad = decode_records(frame)
    return kind, good, len(bad)
