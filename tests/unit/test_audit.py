"""Audit records: JSONL form, timestamps, normalization and the seed's AuditLogger."""

import json
import logging
import os
import random
import re
import stat

import pytest

from pipeline.audit.records import (FLAG_EXEMPT_TYPES, AuditEvent, AuditEventType, AuditLogger,
                            format_timestamp, json_lines, new_event_id, normalize,
                            parse_timestamp, sql_timestamp, to_json_line)
from pipeline.errors import StoreError

T0 = 1_767_225_600_123_456_789  # 2026-01-01T00:00:00.123456789Z
S0 = 1_767_225_600 * 10**9      # the same second, no fraction
TS = '"timestamp":"2026-01-01T00:00:00.123456789Z"'
FLAGS = '"would_deny":false,"blocked":false'


# ---------------------------------------------------------------- JSON lines

@pytest.mark.parametrize("event, line", [
    pytest.param(AuditEvent(T0, "dns_blocked"),
                 f'{{{TS},"event_type":"dns_blocked",{FLAGS}}}', id="flags-always-present"),
    pytest.param(AuditEvent(T0, "connection_blocked", "10.0.0.2", "93.184.216.34", "example.com",
                            443, "TCP", "curl", 4242, "*.example.com", "dns", ["a.example", "b"],
                            True, True, False, 7, "ev-1", "builder", cgroup="/docker/" + "e" * 64,
                            container="e" * 64),
                 f'{{{TS},"event_type":"connection_blocked","src_ip":"10.0.0.2",'
                 '"dst_ip":"93.184.216.34","dst_hostname":"example.com","dst_port":443,'
                 '"protocol":"TCP","process":"curl","pid":4242,"matched_rule":"*.example.com",'
                 '"auto_allowed_type":"dns","cname_chain":["a.example","b"],"mid_stream":true,'
                 '"would_deny":true,"blocked":false,"packets":7,"event_id":"ev-1",'
                 f'"host":"builder","cgroup":"/docker/{"e" * 64}","container":"{"e" * 64}"}}',
                 id="every-field-in-seed-order"),
    pytest.param(AuditEvent(T0, "connection_allowed", dst_port=0, pid=0, packets=1,
                            cname_chain=[], mid_stream=False, blocked=True),
                 f'{{{TS},"event_type":"connection_allowed","would_deny":false,"blocked":true}}',
                 id="zero-empty-false-and-one-packet-omitted"),
    pytest.param(AuditEvent(T0, "dns_blocked", dst_hostname="a<b>&c.example"),
                 f'{{{TS},"event_type":"dns_blocked",'
                 f'"dst_hostname":"a\\u003cb\\u003e\\u0026c.example",{FLAGS}}}', id="html-escapes"),
    pytest.param(AuditEvent(T0, "dns_blocked", dst_hostname="x\u2028y\u2029z"),
                 f'{{{TS},"event_type":"dns_blocked","dst_hostname":"x\\u2028y\\u2029z",{FLAGS}}}',
                 id="line-separators-escaped"),
    pytest.param(AuditEvent(T0, "dns_blocked", dst_hostname="bücher.例え.jp\ufffd"),
                 f'{{{TS},"event_type":"dns_blocked","dst_hostname":"bücher.例え.jp\ufffd",{FLAGS}}}',
                 id="other-non-ascii-kept-as-utf8"),
    pytest.param(AuditEvent(T0, "dns_blocked",
                            process=b"cu\xffrl".decode("utf-8", "surrogateescape")),
                 f'{{{TS},"event_type":"dns_blocked","process":"cu\\ufffdrl",{FLAGS}}}',
                 id="invalid-utf8-byte-becomes-fffd"),
    pytest.param(AuditEvent(T0, "dns_blocked", process="\ud83d"),
                 f'{{{TS},"event_type":"dns_blocked","process":"\\ufffd",{FLAGS}}}',
                 id="lone-surrogate-becomes-fffd"),
    pytest.param(AuditEvent(T0, "dns_blocked", dst_hostname='q"b\\s\n\t\x01\x7f'),
                 f'{{{TS},"event_type":"dns_blocked",'
                 f'"dst_hostname":"q\\"b\\\\s\\n\\t\\u0001\x7f",{FLAGS}}}',
                 id="quotes-backslash-controls"),
])
def test_json_line_matches_the_go_encoder(event, line):
    assert to_json_line(event) == line + "\n"


def test_json_line_is_one_line_of_valid_json():
    event = AuditEvent(T0, "dns_blocked", dst_hostname="a\nb\u2028<c>")
    text = to_json_line(event)
    assert text.count("\n") == 1 and text.endswith("\n")
    assert json.loads(text)["dst_hostname"] == "a\nb\u2028<c>"


@pytest.mark.parametrize("ns, text", [
    (0, "1970-01-01T00:00:00Z"),
    (S0, "2026-01-01T00:00:00Z"),
    (S0 + 1, "2026-01-01T00:00:00.000000001Z"),
    (S0 + 100_000_000, "2026-01-01T00:00:00.1Z"),
    (S0 + 120_000_000, "2026-01-01T00:00:00.12Z"),
    (S0 + 123_456_000, "2026-01-01T00:00:00.123456Z"),
    (T0, "2026-01-01T00:00:00.123456789Z"),
    (951_782_400 * 10**9 + 5 * 10**8, "2000-02-29T00:00:00.5Z"),
])
def test_timestamps_are_utc_with_trimmed_nanoseconds(ns, text):
    assert format_timestamp(ns) == text
    assert parse_timestamp(text) == ns


@pytest.mark.parametrize("ns, text", [
    (0, "1970-01-01T00:00:00.000000000Z"),
    (S0 + 100_000_000, "2026-01-01T00:00:00.100000000Z"),
    (T0, "2026-01-01T00:00:00.123456789Z"),
])
def test_sql_timestamps_have_fixed_width(ns, text):
    assert sql_timestamp(ns) == text
    assert parse_timestamp(text) == ns


def test_sql_timestamps_sort_as_time():
    times = [S0 + 10**8, S0, S0 + 1, S0 + 10**9, T0, 0]
    assert sorted(times, key=sql_timestamp) == sorted(times)


@pytest.mark.parametrize("text, ns", [
    ("2026-01-01T01:00:00+01:00", S0),
    ("2025-12-31T19:30:00.5-04:30", S0 + 500_000_000),
    ("2026-01-01t00:00:00.123456789z", T0),
    ("2026-01-01T00:00:00.0Z", S0),
    ("2026-01-01T00:00:00.12345Z", S0 + 123_450_000),
])
def test_parser_accepts_any_offset_and_fraction(text, ns):
    assert parse_timestamp(text) == ns


@pytest.mark.parametrize("text", [
    "2026-01-01 00:00:00Z", "2026-01-01T00:00:00", "2026-01-01T00:00:00.1234567891Z",
    "2026-02-30T00:00:00Z", "2026-01-01T24:00:00Z", "2026-01-01T00:00:00+24:00", "",
])
def test_parser_rejects_what_is_not_rfc3339(text):
    with pytest.raises(ValueError):
        parse_timestamp(text)


# ---------------------------------------------------------------- normalization

ENFORCED_TYPES = ["connection_blocked", "protocol_blocked", "dns_blocked", "a_future_type"]


@pytest.mark.parametrize("event_type", ENFORCED_TYPES)
@pytest.mark.parametrize("audit_mode, would_deny, blocked", [(True, True, False),
                                                            (False, False, True)])
def test_flags_follow_the_mode(event_type, audit_mode, would_deny, blocked):
    event = normalize(AuditEvent(T0, event_type, would_deny=not would_deny,
                                 blocked=not blocked), audit_mode, 1)
    assert (event.would_deny, event.blocked) == (would_deny, blocked)


@pytest.mark.parametrize("event_type", sorted(FLAG_EXEMPT_TYPES))
@pytest.mark.parametrize("audit_mode", [True, False])
@pytest.mark.parametrize("flags", [(False, False), (True, False), (True, True)])
def test_exempt_types_keep_their_flags(event_type, audit_mode, flags):
    event = normalize(AuditEvent(T0, event_type, would_deny=flags[0], blocked=flags[1]),
                      audit_mode, 1)
    assert (event.would_deny, event.blocked) == flags


def test_the_six_exempt_types():
    assert FLAG_EXEMPT_TYPES == {"connection_allowed", "connection_late_allowed",
                                 "existing_connection", "step_boundary",
                                 "container_attribution", "cgroup_would_block"}


@pytest.mark.parametrize("given, kept", [(0, 99), (T0, T0)])
def test_zero_timestamp_means_now(given, kept):
    assert normalize(AuditEvent(given, "dns_blocked"), True, 99).timestamp == kept


@pytest.mark.parametrize("event_type, allowed", [
    ("connection_allowed", True), ("connection_late_allowed", True),
    ("connection_blocked", False), ("protocol_blocked", False), ("dns_blocked", False),
    ("existing_connection", False),
])
def test_connection_allowed_predicate(event_type, allowed):
    assert AuditEventType(event_type).is_connection_allowed() is allowed


@pytest.mark.parametrize("fields, reason", [
    ({}, None),
    ({"event_type": ""}, "field event_type is not one of"),
    ({"event_type": "drop_table"}, "field event_type is not one of"),
    ({"timestamp": -1}, "field timestamp is outside 0-"),
    ({"timestamp": 1 << 63}, "field timestamp is outside 0-"),
    ({"dst_port": 65535}, None),
    ({"dst_port": 65536}, "field dst_port is outside 0-65535"),
    ({"pid": 1 << 32}, "field pid is outside 0-4294967295"),
    ({"packets": -1}, "field packets is outside 0-"),
    ({"dst_ip": "not-an-ip"}, "field dst_ip is not an IP address"),
    ({"src_ip": "::ffff:zzzz"}, "field src_ip is not an IP address"),
    ({"dst_ip": "", "src_ip": "2001:db8::1"}, None),
    ({"process": "p" * 257}, "field process is longer than 256"),
])
def test_a_record_out_of_range_has_a_problem(fields, reason):
    problem = AuditEvent(**{"timestamp": T0, "event_type": "connection_blocked",
                            **fields}).problem()
    assert (problem or "").startswith(reason or "") and (problem is None) == (reason is None)


def test_event_ids_are_unique_and_sort_by_time():
    ids = [new_event_id(ns) for ns in (T0, T0, T0 + 1, T0 + 10**9)]
    assert len(set(ids)) == 4
    assert sorted(ids[1:]) == ids[1:] and ids[0] < ids[2]


# ---------------------------------------------------------------- AuditLogger

def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def logger(path, audit_mode=True):
    return AuditLogger(path, audit_mode, clock=lambda: T0)


SEED_CALLS = [
    ("log_connection_allowed",
     ("10.0.0.2", "1.1.1.1", "one.one", 53, "dig", 7, "dns", "UDP"),
     {"event_type": "connection_allowed", "src_ip": "10.0.0.2", "dst_ip": "1.1.1.1",
      "dst_hostname": "one.one", "dst_port": 53, "protocol": "UDP", "process": "dig", "pid": 7,
      "auto_allowed_type": "dns", "would_deny": False, "blocked": False}),
    ("log_connection_blocked",
     ("10.0.0.2", "93.184.216.34", "", 443, "curl", 8, "TCP"),
     {"event_type": "connection_blocked", "src_ip": "10.0.0.2", "dst_ip": "93.184.216.34",
      "dst_port": 443, "protocol": "TCP", "process": "curl", "pid": 8,
      "would_deny": True, "blocked": False}),
    ("log_connection_late_allowed",
     ("10.0.0.2", "3.4.5.6", "ec2-3-4-5-6.compute-1.amazonaws.com", "*.compute-1.amazonaws.com",
      443, "git", 9, "TCP"),
     {"event_type": "connection_late_allowed", "src_ip": "10.0.0.2", "dst_ip": "3.4.5.6",
      "dst_hostname": "ec2-3-4-5-6.compute-1.amazonaws.com", "dst_port": 443, "protocol": "TCP",
      "process": "git", "pid": 9, "matched_rule": "*.compute-1.amazonaws.com",
      "would_deny": False, "blocked": False}),
    ("log_dns_blocked", ("evil.example",),
     {"event_type": "dns_blocked", "dst_hostname": "evil.example",
      "would_deny": True, "blocked": False}),
    ("log_existing_connection", ("10.1.1.1", "db.internal", "db.internal", True, ""),
     {"event_type": "existing_connection", "dst_ip": "10.1.1.1", "dst_hostname": "db.internal",
      "matched_rule": "db.internal", "would_deny": False, "blocked": False}),
    ("log_existing_connection", ("10.1.1.2", "", "", False, ""),
     {"event_type": "existing_connection", "dst_ip": "10.1.1.2",
      "would_deny": True, "blocked": True}),
    ("log_protocol_blocked", ("10.0.0.2", "8.8.8.8", "", "ICMP", "ping", 10),
     {"event_type": "protocol_blocked", "src_ip": "10.0.0.2", "dst_ip": "8.8.8.8",
      "protocol": "ICMP", "process": "ping", "pid": 10, "would_deny": True, "blocked": False}),
]


@pytest.mark.parametrize("method, args, expected", SEED_CALLS,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(SEED_CALLS)])
def test_seed_log_methods_write_one_normalized_line(tmp_path, method, args, expected):
    log = logger(tmp_path / "audit.jsonl", audit_mode=True)
    getattr(log, method)(*args)
    log.close()
    assert lines(tmp_path / "audit.jsonl") == [
        {"timestamp": "2026-01-01T00:00:00.123456789Z", **expected}]


def _kernel_event(allowed=False, proto=6, src_port=40000, dst_port=443, host=""):
    from pipeline.events import EnrichedEvent, RawEvent

    raw = RawEvent(4, allowed, proto, 0, "10.0.0.2", "93.184.216.34", src_port, dst_port, T0,
                   321, "curl", 1, "", 0, "")
    return EnrichedEvent.from_raw(raw, host)


# The policy the pipeline judges the twins by: *.example late-allows, the address is an
# auto-allowed (dns) one where the kernel let the connection through.
TWIN_POLICY = """{"defaultAction": "deny", "rules": [
  {"type": "hostname", "value": "*.example", "action": "allow"},
  {"type": "cidr", "value": "93.184.216.34/32", "action": "allow", "autoAddedType": "dns"}]}"""

# (the seed's method and its arguments, the event the pipeline judges)
PIPELINE_TWINS = [
    ("log_connection_allowed",
     ("10.0.0.2", "93.184.216.34", "one.one", 443, "curl", 321, "dns", "TCP"),
     _kernel_event(allowed=True, host="one.one")),
    ("log_connection_blocked", ("10.0.0.2", "93.184.216.34", "", 443, "curl", 321, "TCP"),
     _kernel_event()),
    ("log_connection_late_allowed",
     ("10.0.0.2", "93.184.216.34", "x.example", "*.example", 443, "curl", 321, "TCP"),
     _kernel_event(host="x.example")),
    ("log_protocol_blocked", ("10.0.0.2", "93.184.216.34", "", "GRE", "curl", 321),
     _kernel_event(proto=47, src_port=0, dst_port=47)),
]


@pytest.mark.parametrize("audit_mode", [True, False])
@pytest.mark.parametrize("method, args, event", PIPELINE_TWINS,
                         ids=[twin[0] for twin in PIPELINE_TWINS])
def test_seed_log_methods_write_what_the_pipeline_writes(tmp_path, audit_mode, method, args,
                                                         event):
    """The seed's methods are adapters over the pipeline's path, not a copy of it: the line
    one writes is the line policy's decision, stored by persist's writer, becomes."""
    from pipeline.firewall.outcome import decide
    from pipeline.policy.load import policy_from_text

    policy = policy_from_text(TWIN_POLICY, "policy.json")
    record = decide(event, policy, audit_mode=audit_mode, event_id="", host="").record
    pipeline_log = AuditLogger(tmp_path / "pipeline.jsonl", audit_mode)
    pipeline_log.write([record])
    pipeline_log.close()
    seed_log = logger(tmp_path / "seed.jsonl", audit_mode)
    getattr(seed_log, method)(*args)
    seed_log.close()
    assert lines(tmp_path / "seed.jsonl") == lines(tmp_path / "pipeline.jsonl")


@pytest.mark.parametrize("method, args, expected", [SEED_CALLS[1], SEED_CALLS[5]],
                         ids=["blocked", "existing-not-allowed"])
def test_enforce_mode_sets_blocked(tmp_path, method, args, expected):
    log = logger(tmp_path / "audit.jsonl", audit_mode=True)
    log.set_audit_mode(False)
    assert log.is_audit_mode() is False
    getattr(log, method)(*args)
    log.close()
    [line] = lines(tmp_path / "audit.jsonl")
    assert (line["would_deny"], line["blocked"]) == (expected["blocked"], True)


def test_log_event_keeps_a_given_timestamp(tmp_path):
    log = logger(tmp_path / "audit.jsonl")
    log.log_event(AuditEvent(S0, "dns_blocked", dst_hostname="x"))
    log.close()
    assert lines(tmp_path / "audit.jsonl")[0]["timestamp"] == "2026-01-01T00:00:00Z"


def test_no_path_means_no_file(tmp_path):
    log = AuditLogger(None, True)
    log.log_dns_blocked("x.example")
    log.close()
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_opening_appends_and_never_truncates(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"old":1}\n')
    for name in ("a.example", "b.example"):
        log = logger(path)
        log.log_dns_blocked(name)
        log.close()
    assert [line.get("dst_hostname", "old") for line in lines(path)] == [
        "old", "a.example", "b.example"]


def test_a_new_file_and_its_directories_are_private_whatever_the_umask(tmp_path):
    path = tmp_path / "var" / "lib" / "audit.jsonl"
    previous = os.umask(0o022)
    try:
        logger(path).close()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [stat.S_IMODE(d.stat().st_mode) for d in (path.parent, path.parent.parent)] == [
        0o700, 0o700]


@pytest.mark.parametrize("content, kept", [
    (b'{"a":1}\n{"b":2}\n{"c":', b'{"a":1}\n{"b":2}\n'),
    (b'{"partial', b""),
    (b'{"a":1}\n' + b"x" * 200_000, b'{"a":1}\n'),
    (b'{"a":1}\n', b'{"a":1}\n'),
    (b"", b""),
])
def test_a_partial_last_line_is_cut_at_open(tmp_path, caplog, content, kept):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="sluice.audit"):
        log = logger(path)
    log.log_dns_blocked("after.example")
    log.close()
    assert path.read_bytes() == kept + to_json_line(
        AuditEvent(T0, "dns_blocked", dst_hostname="after.example", would_deny=True)).encode()
    cut = len(content) - len(kept)
    assert [f"cut {cut} byte(s)" in r.getMessage() for r in caplog.records] == (
        [True] if cut else [])


def test_reopen_follows_logrotate(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = logger(path)
    log.log_dns_blocked("before.example")
    path.rename(tmp_path / "audit.jsonl.1")
    log.reopen()
    log.log_dns_blocked("after.example")
    log.close()
    assert [line["dst_hostname"] for line in lines(tmp_path / "audit.jsonl.1")] == [
        "before.example"]
    assert [line["dst_hostname"] for line in lines(path)] == ["after.example"]


def test_write_appends_all_lines_and_close_is_idempotent(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = logger(path)
    events = [AuditEvent(T0 + n, "dns_blocked", dst_hostname=f"{n}.example") for n in range(100)]
    log.write(events)
    log.write([])
    log.close()
    log.close()
    assert path.read_text() == "".join(map(to_json_line, events))
    with pytest.raises(StoreError, match="closed"):
        log.write(events[:1])


@pytest.mark.parametrize("make_path", [
    lambda tmp: tmp / "a-file" / "audit.jsonl",   # parent is a file
    lambda tmp: tmp,                              # a directory
], ids=["parent-is-a-file", "is-a-directory"])
def test_an_unwritable_path_fails_at_construction_naming_it(tmp_path, make_path):
    (tmp_path / "a-file").write_text("")
    path = make_path(tmp_path)
    with pytest.raises(StoreError) as err:
        AuditLogger(path, True)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def go_line(e):
    """The Go encoder's line, written out with the json module: the oracle for json_lines."""
    d = {"timestamp": format_timestamp(e.timestamp), "event_type": e.event_type}
    for name in ("src_ip", "dst_ip", "dst_hostname", "dst_port", "protocol", "process", "pid",
                 "matched_rule", "auto_allowed_type", "cname_chain", "mid_stream"):
        if getattr(e, name):
            d[name] = getattr(e, name)
    d["would_deny"], d["blocked"] = e.would_deny, e.blocked
    if e.packets > 1:
        d["packets"] = e.packets
    for name in ("event_id", "host"):
        if getattr(e, name):
            d[name] = getattr(e, name)
    line = json.dumps(d, ensure_ascii=False, separators=(",", ":"))
    escapes = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
               "\u2029": "\\u2029"}
    return re.sub("[<>&\u2028\u2029\ud800-\udfff]",
                  lambda m: escapes.get(m.group(), "\\ufffd"), line) + "\n"


def test_json_lines_of_random_records_match_the_go_encoder():
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0x80)] + ["é", "例", "\u2028", "\u2029", "\ufffd",
                                                 "\U0001F600", "\ud83d"]
    text = lambda: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))  # noqa: E731
    events = [AuditEvent(rng.randrange(1 << 62), text(), text(), text(), text(),
                         rng.choice([0, 443]), text(), text(), rng.choice([0, 7]), text(),
                         text(), [text() for _ in range(rng.randint(0, 2))],
                         rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5,
                         rng.choice([0, 1, 2, 9]), text(), text())
              for _ in range(3000)]
    for start in range(0, len(events), 100):  # batches, some holding a lone surrogate
        batch = events[start:start + 100]
        assert json_lines(batch).decode() == "".join(map(go_line, batch))
