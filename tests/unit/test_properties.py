"""Property tests (Hypothesis) over every decoder and parser that takes input from outside.

Each property: whatever the input, the parser returns a value or raises its one documented
error, never anything else, and what it accepts is within the limits the stages rely on.
Inputs are both random and wrong-shaped (a valid record with one field replaced, a policy
with one rule broken), since pure noise rarely gets past the first check. max_examples is
set per test so that the whole file runs in well under a minute.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import sqlite3
import struct
import threading
import zlib

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import jsonschema
import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pipeline import limited, messages, wire
from pipeline.audit.records import AuditEvent
from pipeline.dns import packets
from pipeline.dns.cnames import LearnedTargets
from pipeline.dns.enforce import plan_answer
from pipeline.events import AllowRequest, DnsMapping, EnrichedEvent, Notice, RawEvent
from pipeline.audit.importer import ImportReport, read_events
from pipeline.loop import StageIO
from pipeline.policy.load import InvalidPolicy, policy_from_document, policy_from_text
from pipeline.audit.query import QueryError, check_read_only, run_query
from pipeline.kernel.event_layout import RECORD_SIZE, ShortRecord, decode_record
from pipeline.recording import FRAME_HEAD, Header, Recording, RecordingError
from pipeline.replay import NoReverseLookups
from pipeline.rulemaps import DictRuleMaps
from pipeline.dns.answers import parse_answer
from pipeline.stages.enrich import EnrichStage
from pipeline.stages.notify import NotifyStage
from pipeline.stages.persist import PersistStage
from pipeline.stages.policy import PolicyStage
from pipeline.audit.store import AuditStore
from tests.support.stagekit import stage_settings
from tests.support.schemas import load, sample

T0 = 1_764_000_000_000_000_000
I64_MAX = (1 << 63) - 1
FORMATS = jsonschema.FormatChecker()

# ---------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
           | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20))
msgpack_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                              | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                              max_leaves=25)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=5),
    max_leaves=25)
addresses = st.ip_addresses().map(str)
# Text that is nearly an address, or nearly a port: where stage logic once broke.
address_like = (addresses | st.sampled_from(["999.999.1.1", "::ffff:zzzz", "", "10.0.0.1/24",
                                             "fe80::1%lo", "1.2.3", "01.2.3.4", "10.0.0.1\x00"])
                | st.text(alphabet="0123456789abcdef.:%/", max_size=45))
edgy_ints = st.sampled_from([-1, 0, 1, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32,
                             I64_MAX, 1 << 63, (1 << 64) - 1]) \
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)  # what msgpack carries


def any_field_value():
    return msgpack_values | address_like | edgy_ints


# ---------------------------------------------------------------- wire messages

@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_message_or_a_rejection(frame):
    try:
        kind, records, bad = wire.decode_records(frame)
    except wire.MessageError:
        return
    assert kind in wire.REGISTRY and all(r.problem() is None for r in records)


@settings(max_examples=400)
@given(st.sampled_from(sorted(wire.REGISTRY)), st.lists(msgpack_values, max_size=4),
       msgpack_values)
def test_any_records_under_a_known_kind_are_each_accepted_or_rejected(kind, records, version):
    frame = msgpack.packb({"kind": kind, "v": wire.REGISTRY[kind].VERSION if version is None
                           else version,
                           "records": records})
    try:
        _, good, bad = wire.decode_records(frame)
    except wire.MessageError:
        return
    assert len(good) + len(bad) == len(records)


@settings(max_examples=600)
@given(st.sampled_from(sorted(wire.REGISTRY)), st.data())
def test_a_record_with_one_field_replaced_is_accepted_only_within_its_schema(kind, data):
    """The schema (checked by jsonschema, an independent reading of it) agrees with every
    record the wire check lets through."""
    cls = wire.REGISTRY[kind]
    values = list(sample(cls).to_wire())
    field = data.draw(st.integers(min_value=0, max_value=len(values) - 1))
    values[field] = data.draw(any_field_value())
    message = {"kind": kind, "v": cls.VERSION, "records": [values]}
    _, good, bad = wire.decode_records(msgpack.packb(message))
    if good:
        jsonschema.validate(message, load(kind), format_checker=FORMATS)
        for text in _addresses_of(cls, good[0]):
            ipaddress.ip_address(text)  # what stage logic does with an address
    else:
        assert bad[0].reason.startswith(f"{kind}: field ")


def _addresses_of(cls, record):
    for name, limit in wire.limits(cls).items():
        if limit.address:
            value = getattr(record, name)
            yield from [v for v in (value if isinstance(value, list) else [value]) if v]


# ---------------------------------------------------------------- kernel records

@settings(max_examples=400)
@given(st.binary(max_size=RECORD_SIZE + 16))
def test_any_kernel_record_decodes_to_an_event_the_pipeline_takes(data):
    try:
        event = decode_record(data, 0)
    except ShortRecord:
        assert len(data) < RECORD_SIZE
        return
    timestamp = struct.unpack_from("<Q", data, 56)[0]
    expected = None if timestamp <= I64_MAX else \
        "field timestamp_ns is outside 0-9223372036854775807"
    assert event.problem() == expected


# ---------------------------------------------------------------- DNS packets

@settings(max_examples=600)
@given(st.binary(max_size=600))
def test_any_bytes_are_a_query_or_malformed(data):
    simple = packets.simple_question(data)
    try:
        query = packets.parse_query(data)
    except packets.Malformed:
        assert simple is None
        return
    assert len(query.name) <= 1024  # the NAME limit of every message that carries it
    if simple is not None:
        assert simple[0] == query.question and simple[1] == query.udp_limit
    packets.reply(query, packets.REFUSED)


labels = st.binary(min_size=1, max_size=63)


@settings(max_examples=300)
@given(st.lists(labels, min_size=1, max_size=8), st.integers(0, 0xFFFF), st.booleans())
def test_a_well_formed_query_is_parsed_to_its_name(name_labels, qtype, edns):
    assume(sum(len(label) + 1 for label in name_labels) < 255)
    qname = b"".join(bytes([len(label)]) + label for label in name_labels) + b"\0"
    opt = struct.pack("!BHHIH", 0, packets.TYPE_OPT, 1232, 0, 0) if edns else b""
    data = packets.HEADER.pack(7, 0x0100, 1, 0, 0, 1 if edns else 0) + qname + \
        struct.pack("!HH", qtype, 1) + opt
    query = packets.parse_query(data)
    assert packets.simple_question(data) == (query.question, query.udp_limit)
    assert query.qtype == qtype and query.udp_limit == (1232 if edns else 512)
    assert dns.name.from_text(query.qname).labels[:-1] == tuple(name_labels)  # escapes read back


@settings(max_examples=500)
@given(st.binary(max_size=700), st.integers(0, 0xFFFF))
def test_any_upstream_answer_is_parsed_or_ignored(data, qid):
    question = b"\x07example\x03com\x00\x00\x01\x00\x01"
    if packets.answers_question(data, qid, question):
        packets.rcode_of(data)
        packets.is_truncated(data)
        packets.with_id(data, qid)
    parse_answer(data)  # None or facts; never an exception


dns_names = st.lists(st.text(alphabet="abcdefghij-", min_size=1, max_size=20), min_size=1,
                     max_size=4).map(lambda parts: ".".join(parts) + ".test")


@settings(max_examples=100)
@given(st.lists(dns_names, max_size=60, unique=True),
       st.lists(st.tuples(dns_names, dns_names), max_size=6),
       st.lists(addresses, max_size=30), st.integers(0, (1 << 31) - 1), dns_names)
@example([f"hop{n}.test" for n in range(40)], [], ["10.0.0.1"], 60, "start.test")
def test_an_answer_with_any_cnames_and_addresses_makes_messages_in_range(chain, extra, ips,
                                                                          ttl, asked):
    """What dns sends to policy and enrich from an upstream answer passes their inboxes:
    chains as long as an answer holds (loops and stray records among them) included."""
    response = dns.message.make_response(dns.message.make_query(asked, "A"))
    owner = asked
    for target in chain:
        response.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN", "CNAME",
                                                   target + "."))
        owner = target
    for stray_owner, stray_target in extra:
        response.answer.append(dns.rrset.from_text(stray_owner + ".", ttl, "IN", "CNAME",
                                                   stray_target + "."))
    for ip in ips:
        response.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN",
                                                   "AAAA" if ":" in ip else "A", ip))
    facts = parse_answer(response.to_wire(max_size=65535))
    assume(facts is not None)
    policy = policy_from_document({"defaultaction": "deny", "rules": [
        {"type": "hostname", "value": "test", "action": "allow"}]}, "p")
    learned = LearnedTargets()
    for name in (asked, *chain):  # asked again along the chain: derived answers too
        plan = plan_answer(policy, learned, name, facts, 0.0)
        if plan.ask is not None:
            request = AllowRequest("r", plan.ask.name, list(facts.ips), facts.ttl,
                                   list(plan.ask.chain), T0)
            assert request.problem() is None
        if plan.mapping_chain is not None:
            mapping = DnsMapping(name, list(facts.ips), facts.ttl, list(plan.mapping_chain),
                                 T0)
            assert mapping.problem() is None


# ---------------------------------------------------------------- policy files

@settings(max_examples=300)
@given(st.text(max_size=200) | json_values.map(json.dumps))
def test_any_text_is_a_policy_or_one_problem_per_line(text):
    try:
        policy_from_text(text, "p.json")
    except InvalidPolicy as err:
        assert err.lines and all("\n" not in line for line in err.lines)


rule_values = (st.sampled_from(["github.com", "*.example.com", "**.x.test", "10.0.0.0/8",
                                "::/0", "10.0.0.0/33", "", " ", "a..b", "*"])
               | st.tuples(st.ip_addresses(), st.integers(0, 130)).map(lambda t: f"{t[0]}/{t[1]}")
               | st.text(max_size=30))
ports = st.dictionaries(st.sampled_from(["port", "protocol", "PORT", "x"]),
                        edgy_ints | st.sampled_from(["tcp", "udp", "icmp", "all", "TCP"])
                        | json_values, max_size=3)
rules = st.dictionaries(
    st.sampled_from(["type", "value", "action", "ports", "autoaddedtype", "x"]),
    st.sampled_from(["hostname", "cidr", "allow", "deny", "permit"]) | rule_values
    | st.lists(ports, max_size=3) | json_values, max_size=6)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["defaultaction", "rules", "searchdomains", "x"]),
                       st.sampled_from(["allow", "deny"]) | st.lists(rules, max_size=4)
                       | st.lists(st.text(max_size=20), max_size=3) | json_values,
                       max_size=4))
def test_any_policy_document_is_a_policy_or_every_problem(document):
    try:
        policy = policy_from_document(document, "p.json")
    except InvalidPolicy as err:
        assert all(line.startswith("p.json: ") for line in err.lines)
        return
    assert policy.default_action in ("allow", "deny")


# ---------------------------------------------------------------- NDJSON lines

audit_fields = st.fixed_dictionaries({}, optional={
    "timestamp": st.sampled_from(["2025-06-01T10:00:00Z", "2025-06-01T10:00:00.5+02:00",
                                  "9999-12-31T23:59:59Z", "1969-12-31T23:59:59Z", "yesterday"])
    | st.text(max_size=30),
    "event_type": st.sampled_from(["connection_blocked", "dns_blocked", "drop_table", ""]),
    "src_ip": address_like, "dst_ip": address_like, "dst_port": edgy_ints,
    "pid": edgy_ints, "packets": edgy_ints, "process": st.text(max_size=300),
    "blocked": st.booleans() | json_values, "cname_chain": st.lists(st.text(max_size=10))
    | json_values, "host": st.text(max_size=300)})


@settings(max_examples=200)
@given(st.lists(audit_fields.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=80)
                | json_values.map(lambda v: json.dumps(v).encode()), max_size=12))
def test_any_ndjson_stores_only_records_in_range_and_counts_every_line(lines):
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines)
    report = ImportReport()
    rejected = []
    events = list(read_events(io.BytesIO(data), "h", report,
                              lambda line, reason: rejected.append(line)))
    assert all(event.problem() is None for _, event in events)
    assert report.lines == data.count(b"\n") + (not data.endswith(b"\n") and bool(data))
    assert len(events) + sum(report.skipped.values()) == report.lines


# ---------------------------------------------------------------- recordings

def _frame(payload: bytes) -> bytes:
    return FRAME_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


recorded_frames = (
    st.tuples(edgy_ints, st.sampled_from(["raw_events", "dns_mappings", "notices"]),
              st.sampled_from([1, 2]), st.lists(st.lists(msgpack_values, max_size=13), max_size=3))
    .map(lambda f: _frame(msgpack.packb(list(f))))
    | msgpack_values.map(lambda v: _frame(msgpack.packb(v)))
    | st.binary(max_size=60))


def test_any_recording_reads_to_frames_or_one_error(tmp_path):
    path = tmp_path / "rec"

    @settings(max_examples=200)
    @given(st.binary(max_size=80) | st.just(Header("h", "audit", T0).line()),
           st.lists(recorded_frames, max_size=5))
    def run(header, frames):
        path.write_bytes(header + b"".join(frames))
        try:
            with Recording(path) as recording:
                for frame in recording.frames():
                    assert all(record.problem() is None for record in frame.records)
        except RecordingError as err:
            assert str(err).startswith(str(path))

    run()


# ---------------------------------------------------------------- limited JSON

@settings(max_examples=300)
@given(st.text(max_size=200) | json_values.map(json.dumps)
       | st.integers(1, 200).map(lambda n: "[" * n + "]" * n))
def test_limited_loads_is_json_loads_within_its_limits(text):
    try:
        value = limited.loads(text, max_depth=32)
    except limited.LimitError as err:
        assert err.reason in ("not JSON", "not UTF-8 text", "nested deeper than 32 levels")
        return
    # Compared as JSON: the text "NaN" is a document, and NaN is not equal to itself.
    assert json.dumps(value) == json.dumps(json.loads(text))


# ---------------------------------------------------------------- SQL for `sluice query`

sql_words = st.sampled_from([
    "SELECT", "select", "WITH", "VALUES", "INSERT", "DELETE", "UPDATE", "DROP", "ATTACH",
    "PRAGMA", "CREATE", "VACUUM", "REPLACE", "BEGIN", "COMMIT", ";", "--", "/*", "*/", "'",
    '"', "x", "1", "*", "FROM", "audit_events", "INTO", "TABLE", "(", ")", "AS", "t", ",",
    "DATABASE", "'/tmp/x.db'", "writable_schema", "=", "ON", "journal_mode", "OFF", "\n"])


def test_no_sql_text_changes_the_store(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.db"
    store = AuditStore(url)
    store.migrate()
    store.write([AuditEvent(T0, "connection_blocked", dst_ip="10.0.0.1", event_id="e1")])
    store.close()
    before = (tmp_path / "audit.db").read_bytes()
    ran = []

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(sql_words, max_size=14).map(" ".join) | st.text(max_size=60))
    def run(sql):
        try:
            check_read_only(sql)
        except QueryError:
            return
        try:
            with run_query(url, sql) as (_, rows):
                for _ in rows:
                    pass
            ran.append(sql)
        except QueryError:
            pass

    run()
    db = sqlite3.connect(f"file:{tmp_path}/audit.db?mode=ro", uri=True)
    try:
        assert db.execute("SELECT event_id FROM audit_events").fetchall() == [("e1",)]
    finally:
        db.close()
    assert (tmp_path / "audit.db").read_bytes() == before
    assert not list(tmp_path.glob("x.db*")) and not (tmp_path.parent / "x.db").exists()


# ---------------------------------------------------------------- stage logic

def event_values(cls=RawEvent):
    return st.builds(
        cls, ip_version=st.sampled_from([4, 6]), allowed=st.booleans(),
        ip_proto=st.integers(0, 255), flags=st.integers(0, 255), src_ip=addresses,
        dst_ip=addresses, src_port=st.integers(0, 65535), dst_port=st.integers(0, 65535),
        timestamp_ns=st.integers(0, I64_MAX), pid=st.integers(0, (1 << 32) - 1),
        comm=st.text(max_size=16), packets=st.integers(0, I64_MAX),
        event_id=st.text(max_size=128), seq=st.integers(0, I64_MAX))


names = st.text(max_size=40) | dns_names | st.sampled_from(["github.com", "ok.test", "."])
chains = st.lists(names, max_size=32)
enriched = st.builds(lambda raw, hostname, chain: EnrichedEvent.from_raw(raw, hostname, chain),
                     event_values(), names, chains)
allow_requests = st.builds(AllowRequest, st.text(max_size=64), names,
                           st.lists(addresses, max_size=8), st.integers(0, (1 << 32) - 1),
                           chains, st.integers(0, I64_MAX))
notices = st.builds(Notice, st.sampled_from(["connection_blocked", "protocol_blocked"]), names,
                    addresses, st.integers(0, 65535), st.text(max_size=64),
                    st.text(max_size=256), st.integers(0, (1 << 32) - 1),
                    st.integers(0, I64_MAX), st.sampled_from(["audit", "enforce"]))
audit_records = st.builds(
    AuditEvent, st.integers(0, I64_MAX), st.sampled_from(
        ["connection_blocked", "connection_allowed", "dns_blocked", "existing_connection"]),
    addresses | st.just(""), addresses | st.just(""), names, st.integers(0, 65535),
    st.text(max_size=64), st.text(max_size=256), st.integers(0, (1 << 32) - 1), names,
    st.text(max_size=64), chains, st.booleans(), st.booleans(), st.booleans(),
    st.integers(0, I64_MAX), st.text(max_size=128), st.text(max_size=255),
    st.integers(0, I64_MAX))
POLICY = {"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": "test", "action": "allow",
     "ports": [{"port": 443, "protocol": "tcp"}]},
    {"type": "hostname", "value": "*.example.com", "action": "deny"},
    {"type": "cidr", "value": "10.0.0.0/8", "action": "allow"},
    {"type": "cidr", "value": "2001:db8::/32", "action": "deny"}]}


class Harness:
    """A stage set up on real sockets under tmp_path, its handle() called directly."""

    def __init__(self, stage, tmp_path, ctx, **env) -> None:
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps(POLICY))
        self.settings = stage_settings(tmp_path, SLUICE_POLICY=str(policy),
                                       SLUICE_ALLOW_EXISTING_CONNECTIONS="false", **env)
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        self.io = StageIO(stage.name, self.settings, ctx, threading.Event(),
                          logging.getLogger(f"props.{stage.name}"))
        self.stage = stage
        stage.setup(self.io)

    def close(self) -> None:
        try:
            self.stage.teardown()
        finally:
            for sock in self.io.sockets:
                sock.close(linger=0)


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_policy_logic_takes_any_record_in_range(tmp_path, peer, mode):
    """Whatever policy.sock accepts, policy handles, and whatever it sends on passes the
    next inboxes: a record from capture's journal is never refused downstream (it would
    never be acknowledged)."""
    maps = DictRuleMaps()
    downstream = [peer.inbox("persist"), peer.inbox("notify")]
    harness = Harness(PolicyStage(open_maps=lambda s: maps), tmp_path, peer.ctx,
                      SLUICE_MODE=mode)
    try:
        harness.io.reactor.run_due()  # policy's timer programs the maps
        assert harness.io.ready

        @settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(enriched, max_size=8), allow_requests)
        def run(events, request):
            harness.stage.handle("policy", "enriched_events", events)
            reply = messages.decode(harness.stage.reply("policy-allow", "allow_requests",
                                                        [request]))[1]
            assert reply and reply[0].problem() is None
            for feed in harness.io.feeds:
                feed.flush()
            for sock in downstream:
                while sock.poll(0):
                    _, _, bad = wire.decode_records(sock.recv())
                    assert not bad, bad[0]

        run()
    finally:
        harness.close()


def test_enrich_logic_takes_any_record_in_range(tmp_path, zmq_context):
    harness = Harness(EnrichStage(reverse=NoReverseLookups()), tmp_path, zmq_context)
    try:
        @settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(event_values(), max_size=8),
               st.lists(st.builds(DnsMapping, names, st.lists(addresses, max_size=6),
                                  st.integers(0, (1 << 32) - 1), chains,
                                  st.integers(0, I64_MAX)), max_size=4))
        def run(events, mappings):
            harness.stage.handle("enrich", "dns_mappings", mappings)
            harness.stage.handle("enrich", "raw_events", events)
            harness.stage._lookups_ended()

        run()
    finally:
        harness.close()


def test_persist_logic_stores_any_record_in_range(tmp_path, zmq_context):
    harness = Harness(PersistStage(), tmp_path, zmq_context)
    clock = [0.0]
    try:
        @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(audit_records, max_size=6))
        def run(records):
            harness.stage.handle("persist", "audit_records", records)
            clock.append(clock[-1] + 10)
            harness.stage.tick(clock[-1])  # pending from now
            harness.stage.tick(clock[-1] + 5)  # and due: committed, then journaled
            assert not harness.stage.pending and not harness.stage.unjournaled

        run()
        assert "records_rejected" not in harness.io.counters.snapshot()
    finally:
        harness.close()


def test_notify_logic_takes_any_notice_in_range(tmp_path, zmq_context):
    harness = Harness(NotifyStage(), tmp_path, zmq_context)
    try:
        @settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(notices, max_size=8))
        def run(batch):
            harness.stage.handle("notify", "notices", batch)

        run()
    finally:
        harness.close()
