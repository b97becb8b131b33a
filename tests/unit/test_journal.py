"""The journal on its own: append, read back, acknowledge, release, and damaged files."""

from __future__ import annotations

import os
import subprocess

import pytest

from pipeline.journal import (SEGMENT_HEAD, SEGMENT_RECORDS, Acks, Cursor, Frame, Journal,
                              JournalError, event_id, is_marked, read_bitmap, segment_of,
                              unstored_records)
from pipeline.kernel.event_layout import RECORD, RECORD_SIZE, decode_frame


def kernel_record(n: int) -> bytes:
    """A struct sluice_event for a blocked TCP SYN to port n (its number is recognizable)."""
    return RECORD.pack(4, 0, 6, 0, 0x0A000002, 0x5DB8D822, 40000, n % 65536, b"\0" * 16,
                       b"\0" * 16, 1000 + n, 77, 1, b"curl".ljust(16, b"\0"), 0)


def frame(first: int, count: int, slot: int = RECORD_SIZE + 8) -> Frame:
    """count records laid out as ring-buffer slots (an 8-byte header before each)."""
    payload = b"".join(b"\x50\0\0\0\0\0\0\0" + kernel_record(first + i) + b"\0" * (slot - 8 -
                       RECORD_SIZE) for i in range(count))
    return Frame(0, count, slot, 8, RECORD_SIZE, 5_000, payload)


def opened(path, max_bytes=1 << 30) -> Journal:
    journal = Journal(path, max_bytes)
    journal.open()
    return journal


def segments(path, *frames: Frame) -> Journal:
    """A journal with one segment per frame, each written by a run of its own; the last
    run's journal comes back open, its segment the active one."""
    for earlier in frames[:-1]:
        journal = opened(path)
        journal.append(earlier)
        journal.close()
    journal = opened(path)
    journal.append(frames[-1])
    return journal


def stored(journal_id: str, *seqs: int) -> list[tuple[str, int]]:
    """What persist hands the acknowledgements for records seqs of a journal."""
    return [(event_id(journal_id, seq), seq) for seq in seqs]


def read_all(journal: Journal, cursor: Cursor) -> list[Frame]:
    frames = []
    while (f := journal.read(cursor)) is not None:
        frames.append(f)
    return frames


def ports(frames: list[Frame], journal_id: str) -> list[int]:
    return [e.dst_port for f in frames for e in decode_frame(f, journal_id)]


def test_records_come_back_in_order_with_stable_numbers_and_ids(tmp_path):
    journal = opened(tmp_path / "j")
    for first in (0, 3, 10):
        journal.append(frame(first, 3 if first < 10 else 5))
    got = read_all(journal, Cursor(0))
    events = [e for f in got for e in decode_frame(f, journal.journal_id)]
    assert [e.dst_port for e in events] == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14]
    assert [e.seq for e in events] == list(range(1, 12))
    assert events[4].event_id == event_id(journal.journal_id, 5)
    assert events[0].timestamp_ns == 1000 + 5_000 and events[0].comm == "curl"
    assert oct(os.stat(tmp_path / "j").st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (tmp_path / "j").iterdir())


def test_a_restart_keeps_the_id_and_never_reuses_a_number(tmp_path):
    first = opened(tmp_path / "j")
    first.append(frame(0, 4))
    first.close()
    second = opened(tmp_path / "j")
    assert second.journal_id == first.journal_id
    second.append(frame(100, 2))
    seqs = [e.seq for f in read_all(second, Cursor(0)) for e in decode_frame(f, second.journal_id)]
    assert seqs == [1, 2, 3, 4, SEGMENT_RECORDS + 1, SEGMENT_RECORDS + 2]


def test_frames_never_cross_a_segment_and_room_says_how_many_fit(tmp_path):
    journal = opened(tmp_path / "j")
    journal.next_seq = SEGMENT_RECORDS - 1
    assert journal.room(10) == 2
    journal.append(frame(0, 2))
    assert journal.room(10) == 10 and segment_of(journal.next_seq) == 1
    journal.append(frame(2, 3))
    assert sorted(journal.segments) == [0, 1]
    assert ports(read_all(journal, Cursor(0)), journal.journal_id) == [0, 1, 2, 3, 4]


def test_a_cut_last_frame_is_skipped_and_counted(tmp_path):
    journal = opened(tmp_path / "j")
    journal.append(frame(0, 3))
    journal.append(frame(3, 3))
    journal.close()
    path = next((tmp_path / "j").glob("*.seg"))
    os.truncate(path, path.stat().st_size - 7)  # a crash in the middle of the second write
    again = Journal(tmp_path / "j", 1 << 30)
    found = again.open()
    assert found.damaged_segments == 1 and found.damaged_bytes > 0
    assert ports(read_all(again, Cursor(0)), again.journal_id) == [0, 1, 2]


def test_a_corrupt_frame_ends_its_segment_but_not_the_next(tmp_path):
    journal = opened(tmp_path / "j")
    journal.append(frame(0, 2))
    journal.append(frame(2, 2))
    journal.close()
    journal = opened(tmp_path / "j")  # a second segment
    journal.append(frame(50, 2))
    journal.close()
    first = sorted((tmp_path / "j").glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[SEGMENT_HEAD.size + 40] ^= 0xFF  # inside the first frame's payload
    first.write_bytes(bytes(data))
    again = Journal(tmp_path / "j", 1 << 30)
    found = again.open()
    assert found.damaged_segments == 1
    assert ports(read_all(again, Cursor(0)), again.journal_id) == [50, 51]


@pytest.mark.parametrize("garbage", [b"", b"not a journal at all", b"\0" * 4096])
def test_a_segment_that_is_not_one_is_skipped(tmp_path, garbage):
    journal = opened(tmp_path / "j")
    journal.append(frame(0, 1))
    journal.close()
    (tmp_path / "j" / "0000000007.seg").write_bytes(garbage)
    again = Journal(tmp_path / "j", 1 << 30)
    assert again.open().damaged_segments == 1
    assert ports(read_all(again, Cursor(0)), again.journal_id) == [0]
    assert again.next_seq == 8 * SEGMENT_RECORDS + 1


def test_persist_marks_and_capture_releases_only_finished_segments(tmp_path):
    journal = segments(tmp_path / "j", frame(0, 3), frame(10, 2))  # segment 1 is active
    acks = Acks.open(tmp_path / "j")
    jid = journal.journal_id
    acks.mark_all(stored(jid, 1, 3, SEGMENT_RECORDS + 1, SEGMENT_RECORDS + 2))
    acks.mark_all([("someone-else-000000000002", 2),  # not this journal's id: ignored
                   (event_id(jid, 2), 0)])             # not journaled: ignored
    acks.flush()
    assert journal.release() == (0, 1)         # seq 2 is not stored yet
    acks.mark_all(stored(jid, 2))
    acks.mark_all(stored(jid, 2))              # marking twice changes nothing
    acks.flush()
    assert journal.release() == (1, 0)         # segment 0 goes; the active one stays
    assert sorted(journal.segments) == [1]
    assert not (tmp_path / "j" / "acks" / "0000000000.ack").exists()


@pytest.mark.parametrize("seqs", [
    [1, 2, 3, 5, 4],                                          # short runs, one out of order
    list(range(1, 1001)),                                     # one long run (whole bytes)
    list(range(SEGMENT_RECORDS - 99, SEGMENT_RECORDS + 101)),  # a run across two segments
    [*range(70, 200), *range(3, 69), 69, 250],                # held back, sent on later
])
def test_marking_runs_at_once_sets_exactly_the_bits_one_by_one_would(tmp_path, seqs):
    """persist marks what it stored a run of consecutive numbers at a time."""
    journal = opened(tmp_path / "j")
    pairs = stored(journal.journal_id, *seqs)
    pairs += [("someone-else-000000000009", 9),
              (event_id(journal.journal_id, 7), 0)]  # both ignored
    at_once, one_by_one = Acks.open(tmp_path / "j"), Acks.open(tmp_path / "j")
    at_once.mark_all(pairs)
    for pair in pairs:
        one_by_one.mark_all([pair])
    assert at_once.touched == one_by_one.touched == {segment_of(seq) for seq in seqs}
    assert at_once.bitmaps == one_by_one.bitmaps
    marked = {seq for seq in range(1, 2 * SEGMENT_RECORDS + 1)
              if at_once.bitmaps.get(segment_of(seq)) is not None
              and is_marked(at_once.bitmaps[segment_of(seq)], seq)}
    assert marked == set(seqs)


def open_segments(directory) -> list[str]:
    """The journal segments this process has open, by file name (a deleted one says so)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and ".seg" in target:
            names.append(os.path.basename(target))
    return sorted(names)


def test_read_back_keeps_a_segment_open_per_cursor_and_none_that_was_deleted(tmp_path):
    journal = segments(tmp_path / "j", frame(0, 2), frame(10, 2), frame(20, 2))
    assert ports(read_all(journal, Cursor(0)), journal.journal_id) == [0, 1, 10, 11, 20, 21]
    assert open_segments(tmp_path / "j") == ["0000000001.seg", "0000000002.seg",
                                             "0000000002.seg"]  # 2 is written to as well
    live = Cursor(2)
    assert ports(read_all(journal, live), journal.journal_id) == [20, 21]
    journal.append(frame(22, 1))  # written after its segment was opened for reading
    assert ports(read_all(journal, live), journal.journal_id) == [22]
    acks = Acks.open(tmp_path / "j")
    acks.mark_all(stored(journal.journal_id, SEGMENT_RECORDS + 1, SEGMENT_RECORDS + 2))
    acks.flush()
    assert journal.release() == (1, 5)  # segment 1 is stored; 0 and the active 2 stay
    assert open_segments(tmp_path / "j") == ["0000000002.seg", "0000000002.seg"]
    journal.close()
    assert open_segments(tmp_path / "j") == []


def test_unstored_records_are_counted_without_changing_the_journal(tmp_path):
    """What `sluice down` says is left after the stop: records persist has not marked."""
    assert unstored_records(tmp_path / "none") == 0
    journal = segments(tmp_path / "j", frame(0, 3), frame(10, 2))
    journal.close()
    assert unstored_records(tmp_path / "j") == 5
    acks = Acks.open(tmp_path / "j")
    acks.mark_all(stored(journal.journal_id, 1, 2, 3, SEGMENT_RECORDS + 1))
    acks.flush()
    files = sorted(p.name for p in (tmp_path / "j").rglob("*"))
    assert unstored_records(tmp_path / "j") == 1
    assert sorted(p.name for p in (tmp_path / "j").rglob("*")) == files  # nothing released


def test_acks_of_a_released_segment_are_not_written_again(tmp_path):
    journal = opened(tmp_path / "j")
    journal.append(frame(0, 1))
    journal.close()
    acks = Acks.open(tmp_path / "j")
    (tmp_path / "j" / "0000000000.seg").unlink()  # capture released it
    acks.mark_all(stored(journal.journal_id, 1))
    acks.flush()
    assert not (tmp_path / "j" / "acks" / "0000000000.ack").exists()
    assert read_bitmap(tmp_path / "j", 0) == bytearray(SEGMENT_RECORDS // 8)


def test_a_journal_at_its_limit_refuses_new_frames(tmp_path):
    journal = opened(tmp_path / "j", max_bytes=4096)
    assert journal.fits(1000) and not journal.fits(5000)


@pytest.fixture
def small_disk(tmp_path, kernel):
    """A 64 KiB file system of its own (tmpfs), so the test can fill it."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_raises_and_the_next_numbers_are_not_reused(small_disk):
    journal = opened(small_disk / "j")
    with pytest.raises(JournalError, match="cannot write journal .*No space left"):
        for n in range(1000):
            journal.append(frame(n, 8))
    failed_at = journal.next_seq
    assert segment_of(failed_at) == segment_of(1) + 1  # the rest of that segment is skipped
    journal.close()


def test_an_unusable_directory_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(JournalError, match="cannot use journal directory"):
        Journal(tmp_path / "file" / "j", 1 << 20).open()


def test_records_of_an_older_shorter_layout_are_padded(tmp_path):
    short = RECORD_SIZE - 24  # a layout without comm and cgroup_id
    payload = kernel_record(7)[:short]
    events = decode_frame(Frame(1, 1, short, 0, short, 0, payload), "0123456789abcdef")
    assert events[0].dst_port == 7 and events[0].comm == "" and events[0].seq == 1
    assert events[0].cgroup == ""


def test_numbers_are_never_given_twice_even_once_every_segment_is_deleted(tmp_path):
    first = opened(tmp_path / "j")
    first.append(frame(0, 2))
    first.close()
    acks = Acks.open(tmp_path / "j")
    acks.mark_all(stored(first.journal_id, 1, 2))
    acks.flush()
    idle = opened(tmp_path / "j")  # a run with no traffic, whose release deletes segment 0
    assert idle.release() == (1, 0) and not idle.segments
    idle.close()
    third = opened(tmp_path / "j")
    third.append(frame(5, 1))
    [frame_back] = read_all(third, Cursor(0))
    assert frame_back.first_seq == SEGMENT_RECORDS + 1  # not 1 again: that id is stored
