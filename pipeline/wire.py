"""msgpack framing shared by every message kind, and the one validation at each inbox.

A message is one msgpack map {"kind": K, "v": N, "records": [[field, ...], ...]}: a batch of
records of one kind, each a positional array in the order of its class's fields. The
contract for each kind is schemas/<kind>.json; the classes registered here follow it (a test
keeps them in step, value ranges included). Never pickle.

A record is accepted only when every field has its type *and* its range: the field's
annotation may carry a Limit (Annotated[int, U16], Annotated[str, ADDRESS], ...), so ports
are 0-65535, pids and counts fit their C types, addresses parse, strings and lists are
bounded and enums are known. Stage logic never sees a value outside those ranges.
"""

from __future__ import annotations

import dataclasses
import operator
import socket
import typing
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar

import msgpack

from .errors import MessageError

MAX_FRAME = 16 * 1024 * 1024


def is_address(text: str) -> bool:
    """IPv4 or IPv6 address text (no zone, no CIDR): what every address field holds."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):  # ValueError: an embedded NUL
            pass
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


U8 = Limit(0, 0xFF)
U16 = Limit(0, 0xFFFF)
U32 = Limit(0, 0xFFFF_FFFF)
I64 = Limit(0, (1 << 63) - 1)    # nanosecond timestamps and counts: what SQL stores
IP_VERSION = Limit(choices=(4, 6))
ADDRESS = Limit(address=True)
ADDRESS_OR_EMPTY = Limit(address=True, empty=True)
ADDRESSES = Limit(max_len=4096, item_len=45, address=True)  # a 64 KiB answer holds < 4096
NAME = Limit(max_len=1024)      # a 255-byte DNS name, odd bytes written as \DDD escapes
NAMES = Limit(max_len=32, item_len=1024)  # CNAME chains (pipeline/dns/cnames.py MAX_CHAIN)
SHORT = Limit(max_len=64)       # protocol names, tags, ids
COMM = Limit(max_len=16)        # the kernel's TASK_COMM_LEN
PROCESS = Limit(max_len=256)    # a process name (imported logs may hold longer ones)
TEXT = Limit(max_len=4096)      # free text (error messages)
MODE = Limit(choices=("audit", "enforce"))


class WireRecord:
    """Mixin for a dataclass that travels as a positional array."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1
    _checks: ClassVar[tuple[tuple[str, Any, Limit | None], ...]]
    _types: ClassVar[tuple[type, ...]]      # the exact type of each field, for the fast path
    _list_fields: ClassVar[tuple[int, ...]]  # positions of list[str] fields
    _in_range: ClassVar[Any]                # generated: every Limit as one expression
    _getter: ClassVar[Any]

    def to_wire(self) -> tuple:
        return self._getter(self)

    @classmethod
    def from_wire(cls, values: Any) -> typing.Self:
        # Fast path: one C-level comparison of every field's type and one generated range
        # test (records arrive by the hundred thousand per second); the per-field checks
        # only explain a failure.
        if type(values) is list and tuple(map(type, values)) == cls._types and all(
                all(type(x) is str for x in values[i]) for i in cls._list_fields) \
                and cls._in_range(values):
            return cls(*values)
        reason, value = cls.problem_of(values)
        raise MessageError(f"{cls.KIND}: {reason}", value)

    @classmethod
    def problem_of(cls, values: Any) -> tuple[str, str]:
        """(why values are not a record of this kind, the offending value shown short);
        ("", "") if they are one."""
        checks = cls._checks
        if type(values) not in (list, tuple) or len(values) != len(checks):
            return f"expected an array of {len(checks)} fields", ""
        for value, (name, check, limit) in zip(values, checks, strict=True):
            if not check(value):
                return f"field {name} has a bad type", f"{value!r:.40}"
            why = limit.problem(value) if limit is not None else None
            if why:
                return f"field {name} {why}", f"{value!r:.40}"
        return "", ""

    def problem(self) -> str | None:
        """Why this record could not travel (a value out of range), or None."""
        return self.problem_of(self.to_wire())[0] or None


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
R = typing.TypeVar("R", bound=type[WireRecord])


def register(cls: R) -> R:
    """Class decorator: index a WireRecord dataclass by its KIND and prepare its checks."""
    hints = typing.get_type_hints(cls)
    extras = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(typing.cast(Any, cls))  # a dataclass: @dataclass runs first
    limits = [_limit_of(extras[f.name]) for f in fields]
    cls._checks = tuple((f.name, _check_for(hints[f.name]), limit)
                        for f, limit in zip(fields, limits, strict=True))
    cls._types = tuple(typing.get_origin(hints[f.name]) or hints[f.name] for f in fields)
    cls._list_fields = tuple(i for i, t in enumerate(cls._types) if t is list)
    cls._getter = operator.attrgetter(*(f.name for f in fields))
    names: dict[str, Any] = {"is_address": is_address}
    tests = [limit.expression(f"v[{i}]", names) for i, limit in enumerate(limits) if limit]
    cls._in_range = eval(f"lambda v: {' and '.join(tests) or 'True'}", names)
    REGISTRY[cls.KIND] = cls
    return cls


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
    return msgpack.packb(
        {"kind": kind, "v": cls.VERSION, "records": [r.to_wire() for r in records]},
        use_bin_type=True,
    )


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
