"""msgpack framing shared by every message kind.

A message is one msgpack map {"kind": K, "v": N, "records": [[field, ...], ...]}: a batch of
records of one kind, each a positional array in the order of its class's fields. The
contract for each kind is schemas/<kind>.json; the classes registered here follow it (a test
keeps them in step). Never pickle.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from typing import Any, ClassVar, Iterable

import msgpack

from .errors import MessageError

MAX_FRAME = 16 * 1024 * 1024


class WireRecord:
    """Mixin for a dataclass that travels as a positional array."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1
    _checks: ClassVar[tuple[tuple[str, Any], ...]]
    _types: ClassVar[tuple[type, ...]]      # the exact type of each field, for the fast path
    _list_fields: ClassVar[tuple[int, ...]]  # positions of list[str] fields
    _getter: ClassVar[Any]

    def to_wire(self) -> tuple:
        return self._getter(self)

    @classmethod
    def from_wire(cls, values: Any):
        # Fast path: one C-level comparison of every field's type (records arrive by the
        # hundred thousand per second); the per-field checks only explain a failure.
        if type(values) is list and tuple(map(type, values)) == cls._types and all(
                all(type(x) is str for x in values[i]) for i in cls._list_fields):
            return cls(*values)
        checks = cls._checks
        if type(values) is not list or len(values) != len(checks):
            raise MessageError(f"{cls.KIND}: expected an array of {len(checks)} fields")
        for value, (name, check) in zip(values, checks):
            if not check(value):
                raise MessageError(f"{cls.KIND}: field {name} has a bad value {value!r:.40}")
        return cls(*values)


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


REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: index a WireRecord dataclass by its KIND and prepare its checks."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    cls._checks = tuple((f.name, _check_for(hints[f.name])) for f in fields)
    cls._types = tuple(typing.get_origin(hints[f.name]) or hints[f.name] for f in fields)
    cls._list_fields = tuple(i for i, t in enumerate(cls._types) if t is list)
    cls._getter = operator.attrgetter(*(f.name for f in fields))
    REGISTRY[cls.KIND] = cls
    return cls


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
        raise MessageError(f"frame of {len(frame)} bytes is larger than {MAX_FRAME}")
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types for garbage
        raise MessageError(f"not msgpack: {type(err).__name__}") from None
    if type(message) is not dict:
        raise MessageError("message is not a map")
    kind = message.get("kind")
    cls = REGISTRY.get(kind) if type(kind) is str else None
    if cls is None:
        raise MessageError(f"unknown kind {kind!r:.40}")
    if message.get("v") != cls.VERSION:
        raise MessageError(f"{kind}: unsupported version {message.get('v')!r:.20}")
    records = message.get("records")
    if type(records) is not list:
        raise MessageError(f"{kind}: records is not an array")
    return kind, records


def decode(frame: bytes) -> tuple[str, list, int]:
    """Decode a frame into (kind, good records, count of bad records skipped)."""
    kind, raw_records = decode_envelope(frame)
    cls = REGISTRY[kind]
    good, bad = [], 0
    for values in raw_records:
        try:
            good.append(cls.from_wire(values))
        except MessageError:
            bad += 1
    return kind, good, bad
