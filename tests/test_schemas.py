"""The classes in pipeline/ and the contracts in schemas/ describe the same messages."""

import dataclasses
import json
import typing
from pathlib import Path

import jsonschema
import msgpack
import pytest

import pipeline.audit  # noqa: F401  (registers audit_records)
import pipeline.events  # noqa: F401
from pipeline import wire

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
JSON_TYPES = {int: "integer", bool: "boolean", str: "string", float: "number", list[str]: "array"}


def load(kind):
    return json.loads((SCHEMAS / f"{kind}.json").read_text())


def test_every_schema_has_a_class_and_every_class_a_schema():
    files = {p.stem for p in SCHEMAS.glob("*.json") if p.stem not in NON_MESSAGE_SCHEMAS}
    assert files == set(wire.REGISTRY)


NON_MESSAGE_SCHEMAS = {"recording", "otlp_log_record"}  # a file format; what export sends


@pytest.mark.parametrize("kind", sorted(wire.REGISTRY))
def test_class_fields_follow_schema_order_and_types(kind):
    cls = wire.REGISTRY[kind]
    schema = load(kind)
    assert schema["properties"]["kind"]["const"] == kind
    assert schema["properties"]["v"]["const"] == cls.VERSION
    items = schema["properties"]["records"]["items"]["prefixItems"]
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    assert [i["title"] for i in items] == [f.name for f in fields]
    assert [i["type"] for i in items] == [JSON_TYPES[hints[f.name]] for f in fields]


def sample(cls):
    values = {int: 7, bool: True, str: "x", float: 1.5, list[str]: ["a", "b"]}
    hints = typing.get_type_hints(cls)
    return cls(*[values[hints[f.name]] for f in dataclasses.fields(cls)])


@pytest.mark.parametrize("kind", sorted(wire.REGISTRY))
def test_encoded_messages_validate_against_their_schema(kind):
    cls = wire.REGISTRY[kind]
    frame = wire.encode([sample(cls), sample(cls)])
    jsonschema.validate(msgpack.unpackb(frame, raw=False), load(kind))
    decoded_kind, records, bad = wire.decode(frame)
    assert (decoded_kind, bad) == (kind, 0)
    assert records == [sample(cls), sample(cls)]


@pytest.mark.parametrize("frame, reason", [
    (b"\xc1garbage", "not msgpack"),
    (msgpack.packb([1, 2, 3]), "not a map"),
    (msgpack.packb({"kind": "nope", "v": 1, "records": []}), "unknown kind"),
    (msgpack.packb({"kind": "raw_events", "v": 99, "records": []}), "unsupported version"),
    (msgpack.packb({"kind": "raw_events", "v": 2, "records": {}}), "records is not an array"),
])
def test_broken_frames_are_rejected_with_a_reason(frame, reason):
    with pytest.raises(wire.MessageError, match=reason):
        wire.decode(frame)


def test_a_bad_record_is_skipped_and_counted_while_good_ones_pass():
    good = sample(pipeline.events.RawEvent)
    frame = msgpack.packb({"kind": "raw_events", "v": 2,
                           "records": [list(good.to_wire()), [1, 2], list(good.to_wire())[:-1] + ["nine"]]})
    kind, records, bad = wire.decode(frame)
    assert records == [good] and bad == 2
