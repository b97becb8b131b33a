"""Recording files: round trip, a cut last frame, tail repair on restart, rotation, failures."""

import json
import logging
from pathlib import Path

import jsonschema
import msgpack
import pytest

from pipeline.events import DnsMapping, RawEvent
from pipeline.loop import Counters
from pipeline.recording import (FRAME_HEAD, Header, Recorder, Recording, RecordingError,
                                RecordingWriter, decode_frame, in_replay_order, open_recorder)
from tests.support.stagekit import stage_settings

T0 = 1_767_225_600_000_000_000
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "recording.json")
                    .read_text())
log = logging.getLogger("test")


def raw(port: int) -> RawEvent:
    return RawEvent(4, False, 6, 0, "10.0.0.2", "93.184.216.34", 40000, port, T0 + port, 7,
                    "curl", 1, "", 0, "")


def mapping(name: str) -> DnsMapping:
    return DnsMapping(name, ["93.184.216.34"], 60, [], T0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 1000
        return self.now


def recorder(path: Path, max_bytes: int = 1 << 20, host: str = "h", mode: str = "audit"):
    writer = RecordingWriter(path, max_bytes, Header(host, mode, T0))
    return Recorder(writer, Counters(), log, clock=Clock())


def frames(path: Path):
    with Recording(path) as recording:
        return [(f.kind, f.records) for f in recording.frames()]


def test_round_trip_keeps_kinds_records_and_order(tmp_path):
    path = tmp_path / "rec"
    rec = recorder(path)
    rec.add("raw_events", [raw(1), raw(2)])
    rec.add("dns_mappings", [mapping("example.com")])
    rec.add("raw_events", [raw(3)])
    rec.close()
    assert frames(path) == [("raw_events", [raw(1), raw(2)]),
                            ("dns_mappings", [mapping("example.com")]), ("raw_events", [raw(3)])]
    with Recording(path) as recording:
        assert recording.header == Header("h", "audit", T0)
        arrivals = [f.arrival_ns for f in recording.frames()]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) == 3
    assert rec.counters.get("recorded") == 4


@pytest.mark.parametrize("version, fields, cgroup", [
    (1, [], ""), (2, ["cap-1-9", 9], ""), (3, ["cap-1-9", 9, "/docker/" + "a" * 64],
                                           "/docker/" + "a" * 64)])
def test_older_kernel_events_replay_as_new_ones_keeping_what_they_had(version, fields, cgroup):
    old = list(raw(443).to_wire())[:12] + fields
    payload = msgpack.packb([T0, "raw_events", version, [old]], use_bin_type=True)
    [event] = decode_frame(payload, "rec").records
    assert (event.dst_port, event.event_id, event.seq, event.cgroup) == (443, "", 0, cgroup)


def test_header_and_frames_follow_the_documented_schema(tmp_path):
    path = tmp_path / "rec"
    rec = recorder(path)
    rec.add("raw_events", [raw(1)])
    rec.close()
    data = path.read_bytes()
    line, rest = data.split(b"\n", 1)
    magic, version, meta = line.split(b" ", 2)
    assert (magic, version) == (b"sluice-recording", b"1")
    jsonschema.validate(json.loads(meta), {**SCHEMA["$defs"]["header"], "$defs": SCHEMA["$defs"]})
    length, _ = FRAME_HEAD.unpack(rest[:8])
    payload = msgpack.unpackb(rest[8:8 + length], raw=False)
    jsonschema.validate(payload, {**SCHEMA["$defs"]["frame"]})


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
def test_a_cut_last_frame_is_skipped_with_a_warning(tmp_path, caplog, cut):
    path = tmp_path / "rec"
    rec = recorder(path)
    rec.add("raw_events", [raw(1)])
    rec.add("raw_events", [raw(2)])
    rec.close()
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with caplog.at_level(logging.WARNING):
        assert frames(path) == [("raw_events", [raw(1)])]
    assert "cut last frame" in caplog.text


def test_a_zero_filled_tail_counts_as_cut_but_damage_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "rec"
    rec = recorder(path)
    for port in (1, 2, 3):
        rec.add("raw_events", [raw(port)])
    rec.close()
    data = path.read_bytes()
    path.write_bytes(data + bytes(100))
    assert len(frames(path)) == 3
    broken = bytearray(data)
    broken[data.index(b"\n") + 20] ^= 0xFF  # inside the first frame's payload
    path.write_bytes(bytes(broken))
    with pytest.raises(RecordingError, match="damaged frame at byte"):
        frames(path)


def test_a_restarted_recorder_cuts_the_partial_frame_and_appends(tmp_path):
    path = tmp_path / "rec"
    rec = recorder(path)
    rec.add("raw_events", [raw(1)])
    rec.add("raw_events", [raw(2)])
    rec.close()
    path.write_bytes(path.read_bytes()[:-3])
    again = recorder(path)
    again.add("raw_events", [raw(3)])
    again.close()
    assert frames(path) == [("raw_events", [raw(1)]), ("raw_events", [raw(3)])]
    assert not list(tmp_path.glob("rec.*"))


def test_a_recording_of_another_mode_is_rotated_away_not_appended_to(tmp_path):
    path = tmp_path / "rec"
    first = recorder(path, mode="audit")
    first.add("raw_events", [raw(1)])
    first.close()
    second = recorder(path, mode="enforce")
    second.add("raw_events", [raw(2)])
    second.close()
    assert frames(tmp_path / "rec.1") == [("raw_events", [raw(1)])]
    assert frames(path) == [("raw_events", [raw(2)])]
    with Recording(path) as recording:
        assert recording.header.mode == "enforce"


def test_a_file_that_is_not_a_recording_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    settings = stage_settings(tmp_path, SLUICE_RECORD=str(path))
    with pytest.raises(RecordingError, match="not a sluice recording"):
        open_recorder(settings, Counters(), log)
    assert path.read_text() == "my notes\n"


def test_rotation_by_size_keeps_every_frame_in_order(tmp_path):
    path = tmp_path / "rec"
    rec = recorder(path, max_bytes=600)
    for port in range(1, 41):
        rec.add("raw_events", [raw(port)])
        if port % 7 == 0:
            rec.flush()
    rec.close()
    files = sorted(tmp_path.glob("rec*"))
    assert len(files) > 3
    assert all(f.stat().st_size <= 600 for f in files)
    replayed = [r.dst_port for f in in_replay_order(files) for _, batch in frames(f)
                for r in batch]
    assert replayed == list(range(1, 41))


def test_a_failing_disk_drops_counts_and_logs_once_without_raising(tmp_path, caplog):
    rec = recorder(tmp_path / "rec")

    def full(_frames):
        raise OSError(28, "No space left on device")

    rec.writer.write = full
    with caplog.at_level(logging.WARNING):
        for port in (1, 2, 3):
            rec.add("raw_events", [raw(port), raw(port)])
            rec.flush()
    assert rec.counters.get("recording_dropped") == 6
    assert rec.counters.get("recording_errors") == 3
    assert caplog.text.count("No space left on device") == 1


def test_recording_is_off_without_the_setting(tmp_path):
    rec = open_recorder(stage_settings(tmp_path), Counters(), log)
    rec.add("raw_events", [raw(1)])
    rec.flush()
    assert not list(tmp_path.iterdir())


def test_the_setting_starts_a_recorder_for_this_host_and_mode(tmp_path):
    settings = stage_settings(tmp_path, SLUICE_RECORD=str(tmp_path / "sub" / "rec"),
                              SLUICE_MODE="enforce")
    rec = open_recorder(settings, Counters(), log)
    rec.add("dns_mappings", [mapping("a.example")])
    rec.close()
    recording = Recording(tmp_path / "sub" / "rec")
    assert (recording.header.host, recording.header.mode) == ("test-host", "enforce")
    assert (tmp_path / "sub" / "rec").stat().st_mode & 0o777 == 0o600
    recording.close()
