"""The classes in pipeline/ and the contracts in schemas/ describe the same messages."""

import typing

import jsonschema
import msgpack
import msgspec
import pytest

import pipeline.audit.records
import pipeline.events
from pipeline import wire
from tests.support.schemas import SCHEMAS, load, sample

JSON_TYPES = {int: "integer", bool: "boolean", str: "string", float: "number", list[str]: "array"}


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
    fields = msgspec.structs.fields(cls)
    assert [i["title"] for i in items] == [f.name for f in fields]
    assert [i["type"] for i in items] == [JSON_TYPES[wire.plain_type(hints[f.name])]
                                           for f in fields]


IP_FORMATS = [{"format": "ipv4"}, {"format": "ipv6"}]


def fragment(limit: wire.Limit) -> dict:
    """What a field's schema must say for its Limit."""
    if limit.item_len is not None:  # a list of strings
        items = {"type": "string", "maxLength": limit.item_len}
        if limit.address:
            items["anyOf"] = IP_FORMATS
        return {"maxItems": limit.max_len, "items": items}
    out = {}
    if limit.choices:
        out["enum"] = list(limit.choices)
    if limit.lo is not None:
        out["minimum"], out["maximum"] = limit.lo, limit.hi
    if limit.max_len is not None:
        out["maxLength"] = limit.max_len
    if limit.address:
        out["anyOf"] = ([{"const": ""}] if limit.empty else []) + IP_FORMATS
    return out


@pytest.mark.parametrize("kind", sorted(wire.REGISTRY))
def test_every_value_range_is_in_the_schema(kind):
    items = load(kind)["properties"]["records"]["items"]["prefixItems"]
    limits = wire.limits(wire.REGISTRY[kind])
    for item in items:
        limit = limits.get(item["title"])
        assert limit is not None or item["type"] == "boolean", f"{kind}.{item['title']} unbounded"
        if limit is not None:
            assert {k: item.get(k) for k in fragment(limit)} == fragment(limit), item["title"]


@pytest.mark.parametrize("kind", sorted(wire.REGISTRY))
def test_encoded_messages_validate_against_their_schema(kind):
    cls = wire.REGISTRY[kind]
    frame = wire.encode([sample(cls), sample(cls)])
    jsonschema.validate(msgpack.unpackb(frame, raw=False), load(kind),
                        format_checker=jsonschema.FormatChecker())
    decoded_kind, records, bad = wire.decode(frame)
    assert (decoded_kind, bad) == (kind, 0)
    assert records == [sample(cls), sample(cls)]


@pytest.mark.parametrize("frame, reason", [
    (b"\xc1garbage", "not msgpack"),
    (msgpack.packb([1, 2, 3]), "not a map"),
    (msgpack.packb({"kind": "nope", "v": 1, "records": []}), "unknown kind"),
    (msgpack.packb({"kind": "raw_events", "v": 99, "records": []}), "unsupported version"),
    (msgpack.packb({"kind": "raw_events", "v": 3, "records": {}}), "records is not an array"),
])
def test_broken_frames_are_rejected_with_a_reason(frame, reason):
    with pytest.raises(wire.MessageError, match=reason):
        wire.decode(frame)


def test_a_bad_record_is_skipped_and_counted_while_good_ones_pass():
    good = sample(pipeline.events.RawEvent)
    frame = msgpack.packb({"kind": "raw_events", "v": 3,
                           "records": [list(good.to_wire()), [1, 2],
                                       list(good.to_wire())[:-2] + ["nine", ""]]})
    kind, records, bad = wire.decode(frame)
    assert records == [good] and bad == 2
