"""Files people hand us, read with limits: policy files, NDJSON imports, recordings.

Each test first hands over what once broke sluice (a 100,000-level nested policy, an import
line that aborted the whole file, junk that an import stored), then checks the one clear
line naming the file, the line and the problem, and that everything valid still works.
"""

import io
import json
import re
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import limited, messages
from pipeline.events import EnrichedEvent, RawEvent
from pipeline.audit.importer import import_file
from pipeline.policy.load import InvalidPolicy, load_policy_file
from pipeline.audit.query import run_query
from pipeline.recording import FRAME_HEAD, Header, Recording, RecordingError
from pipeline.names.reverse import ReverseResolver
from pipeline.rulemaps import ALLOW, DictRuleMaps
from pipeline.stages.enrich import EnrichStage
from pipeline.stages.policy import PolicyStage
from tests.support.stagekit import Peer, StageThread, stage_settings
from tests.support.tools.ptrserver import PtrServer
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000
DEEP = "[" * 100_000
POLICY = {"defaultAction": "deny", "rules": [
    {"type": "cidr", "value": "10.1.0.0/16", "action": "allow"}]}


# ---------------------------------------------------------------- the shared reader

@pytest.mark.parametrize("text, reason", [
    (DEEP, "nested deeper than 32 levels"),
    ("{" * 40 + "}" * 40, "nested deeper than 32 levels"),
    ('{"a": 1', "not JSON"),
    (b"\xff\xfe", "not UTF-8 text"),
])
def test_loads_refuses_with_a_reason(text, reason):
    with pytest.raises(limited.LimitError) as caught:
        limited.loads(text)
    assert caught.value.reason == reason


def test_brackets_inside_strings_are_not_nesting():
    assert limited.loads('{"a": "' + "[" * 1000 + '", "b": ["\\"]"]}')["b"] == ['"]']


def test_json_lines_gives_each_line_its_document_or_its_problem():
    data = b'{"a": 1}\n\n' + b"x" * 5000 + b"\n" + b"[" * 50 + b'\n{"b": 2}\r\n{"c"'
    got = [(line.number, line.problem, line.document)
           for line in limited.json_lines(io.BytesIO(data), max_line_bytes=4096, max_depth=8)]
    assert got == [(1, "", {"a": 1}), (2, "blank line", None),
                   (3, "line longer than 4096 bytes", None),
                   (4, "nested deeper than 8 levels", None), (5, "", {"b": 2}),
                   (6, "not JSON", None)]


def test_read_json_file_names_the_file(tmp_path):
    path = tmp_path / "big.json"
    path.write_text("[" + "1," * 1000 + "1]")
    with pytest.raises(limited.LimitError, match=f"^{path}: larger than 100 bytes$"):
        limited.read_json_file(path, max_bytes=100)
    assert len(limited.read_json_file(path)) == 1001


# ---------------------------------------------------------------- policy files

def test_a_deeply_nested_policy_is_one_line_not_a_recursion_error(tmp_path):
    """Breakage 4, at its root: json.loads raised RecursionError."""
    path = tmp_path / "policy.json"
    path.write_text(DEEP)
    with pytest.raises(InvalidPolicy) as caught:
        load_policy_file(path)
    assert caught.value.lines == (f"{path}: nested deeper than 16 levels",)


def test_an_oversized_policy_is_refused_unread(tmp_path):
    path = tmp_path / "policy.json"
    with open(path, "wb") as f:
        f.truncate(17 << 20)
    with pytest.raises(InvalidPolicy, match="larger than 16777216 bytes"):
        load_policy_file(path)


def write_policy(tmp_path, text):
    path = tmp_path / "policy.json"
    path.write_text(text)
    return path


def test_policy_keeps_its_policy_when_a_reload_is_deeply_nested(tmp_path, peer):
    """Breakage 4: policy, enrich and dns crashed with RecursionError on reload."""
    maps = DictRuleMaps()
    path = write_policy(tmp_path, json.dumps(POLICY))
    settings = stage_settings(tmp_path, SLUICE_POLICY=str(path), SLUICE_MODE="enforce",
                              SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    stage = StageThread(PolicyStage(open_maps=lambda s: maps), settings).start()
    out = peer.inbox("persist")
    path.write_text(DEEP)
    wait_for(lambda: stage.counters().get("policy_reload_failures"), "the refused reload")
    assert maps.verdict("10.1.0.9", 443, 6) == ALLOW  # the old policy's maps, untouched
    peer.pusher("policy").send(messages.encode(
        [EnrichedEvent.from_raw(RawEvent(4, True, 6, 0, "10.0.0.2", "10.1.0.9", 4000, 443,
                                         T0, 7, "curl", 1, "", 0, ""))]))
    [record] = Peer.receive(out, 1)
    assert record.event_type == "connection_allowed"
    assert stage.finish() == 0


def test_enrich_keeps_its_names_when_a_reload_is_deeply_nested(tmp_path, peer):
    path = write_policy(tmp_path, json.dumps(POLICY))
    with PtrServer({}) as names:
        stage = StageThread(EnrichStage(ReverseResolver("127.0.0.1", port=names.port)),
                            stage_settings(tmp_path, SLUICE_POLICY=str(path))).start()
        path.write_text(DEEP)
        wait_for(lambda: stage.counters().get("policy_reload_failures"), "the refused reload")
        assert stage.thread.is_alive()
        assert stage.finish() == 0


# ---------------------------------------------------------------- NDJSON imports

GOOD = {"timestamp": "2025-06-01T10:00:00Z", "event_type": "connection_blocked",
        "dst_ip": "203.0.113.9", "dst_port": 443, "protocol": "TCP", "blocked": True}


def test_import_stores_every_valid_line_and_reports_each_rejected_one(tmp_path):
    """Breakage 5: a deeply nested line aborted the whole import with a traceback, and a
    line with event_type drop_table and dst_ip not-an-ip was stored."""
    lines = [json.dumps(GOOD),
             '{"timestamp": "2025-06-01T10:00:01Z", "x": ' + "[" * 100_000 + "}",
             json.dumps({**GOOD, "event_type": "drop_table", "dst_ip": "not-an-ip"}),
             json.dumps({**GOOD, "dst_ip": "not-an-ip"}),
             json.dumps({**GOOD, "src_ip": "10.0.0.1/24"}),
             json.dumps({**GOOD, "pid": 2 ** 63}),
             json.dumps({**GOOD, "timestamp": "9999-01-01T00:00:00Z"}),
             '{"a": "' + "x" * (2 << 20) + '"}',
             json.dumps({**GOOD, "dst_port": 80})]
    path = tmp_path / "log.ndjson"
    path.write_text("\n".join(lines) + "\n")
    db = f"sqlite:///{tmp_path}/audit.db"
    rejected = []
    report = import_file(path, db, "h", lambda line, reason: rejected.append((line, reason)))
    assert (report.lines, report.stored) == (9, 2)
    assert [line for line, _ in rejected] == [2, 3, 4, 5, 6, 7, 8]
    reasons = dict(rejected)
    assert reasons[2] == "nested deeper than 8 levels"
    assert reasons[3].startswith("field event_type is not one of connection_blocked")
    assert reasons[4] == reasons[5].replace("src_ip", "dst_ip") == (
        "field dst_ip is not an IP address")
    assert reasons[6] == "field pid is outside 0-4294967295"
    assert reasons[7].startswith("field timestamp is outside 0-")
    assert reasons[8] == "line longer than 1048576 bytes"
    with run_query(db, "SELECT event_type, dst_ip, dst_port FROM audit_events "
                       "ORDER BY dst_port") as (_, rows):
        assert list(rows) == [("connection_blocked", "203.0.113.9", 80),
                              ("connection_blocked", "203.0.113.9", 443)]


def test_the_import_command_lists_each_rejected_line_on_stderr(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli.app import app

    path = tmp_path / "log.ndjson"
    path.write_text(json.dumps(GOOD) + "\n" + "[" * 5000 + "\n" + json.dumps(
        {**GOOD, "event_type": "drop_table"}) + "\n")
    result = CliRunner().invoke(app, ["import", str(path), "--db",
                                      f"sqlite:///{tmp_path}/audit.db"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "read 3 line(s): stored 1, skipped 2"
    assert result.stderr.splitlines()[0] == f"{path}:2: nested deeper than 8 levels"
    assert result.stderr.splitlines()[1].startswith(f"{path}:3: field event_type is not one")


# ---------------------------------------------------------------- recordings

def recording(tmp_path, header: bytes, *payloads: bytes):
    path = tmp_path / "rec"
    data = header
    for payload in payloads:
        data += FRAME_HEAD.pack(len(payload), zlib.crc32(payload)) + payload
    path.write_bytes(data)
    return path


def read_all(path):
    with Recording(path) as rec:
        return list(rec.frames())


GOOD_HEADER = Header("h", "audit", T0).line()
RAW = list(RawEvent(4, False, 6, 0, "10.0.0.2", "10.1.0.9", 4000, 443, T0, 7, "curl", 1, "", 0,
                    "").to_wire())


@pytest.mark.parametrize("header, problem", [
    (b'sluice-recording 1 {"host": ' + b"[" * 3000 + b"}\n", "nested deeper than 2 levels"),
    (b'sluice-recording 1 {"host": 7, "mode": "audit", "created_ns": 1}\n', "host is not"),
    (b'sluice-recording 1 {"host": "h", "mode": "x", "created_ns": 1}\n', "mode is not"),
    (b'sluice-recording 1 {"host": "h", "mode": "audit", "created_ns": -1}\n', "created_ns"),
    (b'sluice-recording 1 {"host": "h"}\n', "missing"),
])
def test_a_bad_recording_header_is_one_line(tmp_path, header, problem):
    path = recording(tmp_path, header)
    with pytest.raises(RecordingError, match=problem) as caught:
        read_all(path)
    assert str(caught.value).startswith(f"{path}: bad recording header")


@pytest.mark.parametrize("frame, problem", [
    (msgpack.packb([T0, "raw_events", 3, [RAW[:5] + ["999.1.1.1"] + RAW[6:]]]),
     "field dst_ip is not an IP address"),
    (msgpack.packb(["soon", "raw_events", 1, []]), "arrival_ns is not a time"),
    (msgpack.packb([T0, ["raw_events"], 1, []]), "is not a recorded kind"),
    (msgpack.packb([T0, "audit_records", 1, []]), "is not a recorded kind"),
    (msgpack.packb([T0, "raw_events", 1, {}]), "records is not an array of arrays"),
    (msgpack.packb({"a": 1}), "not an array of arrival_ns"),
    (b"\x91" * 100_000, "undecodable frame"),
])
def test_a_bad_frame_is_one_line_naming_the_file_and_its_offset(tmp_path, frame, problem):
    good = msgpack.packb([T0, "raw_events", 3, [RAW]])
    path = recording(tmp_path, GOOD_HEADER, good, frame, good)
    offset = len(GOOD_HEADER) + FRAME_HEAD.size + len(good)
    with pytest.raises(RecordingError, match=problem) as caught:
        read_all(path)
    assert str(caught.value).startswith(f"{path}: undecodable frame at byte {offset}: ")


# ---------------------------------------------------------------- expected-blocks lists

def test_an_expected_blocks_line_of_many_stars_is_matched_at_once(tmp_path):
    """`*` in an expected-blocks line became `.*` of a regular expression: 21 characters of
    `*a*a...` took 80 s against a name that did not match, and `sluice down` stood still."""
    from pipeline.report.gate import glob_matches, read_expected

    path = tmp_path / "expected"
    path.write_text("*a" * 400 + "c:443\n")
    [entry] = read_expected(path)
    assert not entry.matches("a" * 1000, 443)
    assert entry.matches("a" * 1000 + "c", 443)
    assert glob_matches("a*b*c", "axxbyyc") and not glob_matches("a*b*c", "axxcyyb")
    assert glob_matches("*", "") and not glob_matches("ab*ba", "aba")


@settings(max_examples=400)
@given(st.text(alphabet="ab*", max_size=8), st.text(alphabet="ab", max_size=10))
def test_expected_blocks_globs_mean_what_the_regular_expression_says(pattern, text):
    from pipeline.report.gate import glob_matches

    regex = re.compile(".*".join(re.escape(part) for part in pattern.split("*")))
    assert glob_matches(pattern, text) is bool(regex.fullmatch(text))
