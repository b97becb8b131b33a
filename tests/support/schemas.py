"""The message contracts in schemas/ and a sample of each message class: a valid value in
every field, within its limits (an allowed choice, an address where one is expected)."""

import json
import typing
from pathlib import Path

import msgspec

from pipeline import wire

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def load(kind):
    return json.loads((SCHEMAS / f"{kind}.json").read_text())


def sample_value(hint, limit):
    if limit is not None and limit.choices:
        return limit.choices[0]
    if limit is not None and limit.address:
        return ["10.0.0.7", "2001:db8::7"] if hint == list[str] else "10.0.0.7"
    return {int: 7, bool: True, str: "x", float: 1.5, list[str]: ["a", "b"]}[hint]


def sample(cls):
    hints = typing.get_type_hints(cls)
    limits = wire.limits(cls)
    return cls(*[sample_value(wire.plain_type(hints[f.name]), limits.get(f.name))
                 for f in msgspec.structs.fields(cls)])
