"""capture's ring-buffer reader (pipeline/kernel/ringbuf.py) on a file laid out as the
kernel lays out a BPF ring buffer: the consumer page, the producer page, then the data.

The kernel's own buffer cannot be written from user space, so a race with the producer is
played here by changing the file between the reader's two looks at a header.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from pipeline.journal import Frame, Journal
from pipeline.kernel.ringbuf import BUSY, DISCARD, HEADER, RingReader

PAGE = mmap.PAGESIZE
SIZE = 4 * PAGE
RECORD = 88
SLOT = (RECORD + HEADER + 7) & ~7


class FakeRing:
    """The producer's side: records written into the data pages, positions in their pages."""

    def __init__(self, path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, 2 * PAGE + 2 * SIZE)
        self.prod = 0

    def write(self, payload: int, length: int = RECORD, flags: int = 0) -> int:
        """One record (its bytes all `payload`), BUSY set while flags says so; its offset."""
        at = self.prod
        self.header(at, length | flags)
        os.pwrite(self.fd, bytes([payload]) * length, 2 * PAGE + at % SIZE + HEADER)
        self.prod += (length + HEADER + 7) & ~7
        os.pwrite(self.fd, struct.pack("<Q", self.prod), PAGE)
        return at

    def header(self, at: int, value: int) -> None:
        os.pwrite(self.fd, struct.pack("<II", value, 0), 2 * PAGE + at % SIZE)


@pytest.fixture
def ring(tmp_path):
    fake = FakeRing(tmp_path / "ring")
    reader = RingReader(fake.fd, SIZE, RECORD)
    yield fake, reader
    reader.close()
    os.close(fake.fd)


def payloads(slots: bytes) -> list[int]:
    return [slots[i + HEADER] for i in range(0, len(slots), SLOT)]


def test_finished_records_are_taken_in_one_run(ring):
    fake, reader = ring
    for n in (1, 2, 3):
        fake.write(n)
    slots, count = reader.read()
    assert (count, payloads(slots)) == (3, [1, 2, 3])
    assert reader.read() == (b"", 0)


def test_a_record_still_being_written_ends_the_run_and_is_taken_once_finished(ring):
    fake, reader = ring
    fake.write(1)
    busy = fake.write(2, flags=BUSY)
    fake.write(3)
    slots, count = reader.read()
    assert payloads(slots) == [1]
    assert reader.read() == (b"", 0)
    fake.header(busy, RECORD)
    assert payloads(reader.read()[0]) == [2, 3]
    assert reader.skipped == 0


def test_a_record_finished_between_the_check_and_the_second_look_is_read_not_skipped(ring):
    """The race that lost one record in a 100,000-record flood: the head was busy when its
    header column was read and finished when the header was read again."""
    fake, reader = ring
    busy = fake.write(1, flags=BUSY)
    fake.write(2)
    check = reader._uniform_prefix

    def finished_right_after(start: int, n: int) -> int:
        ready = check(start, n)
        fake.header(busy, RECORD)
        return ready

    reader._uniform_prefix = finished_right_after
    slots, count = reader.read()
    reader._uniform_prefix = check
    slots += reader.read()[0]
    assert payloads(slots) == [1, 2]
    assert reader.skipped == 0


def test_discarded_records_and_other_sizes_are_stepped_over_counted_and_the_rest_read(ring):
    fake, reader = ring
    fake.write(1, flags=DISCARD)
    fake.write(2, length=40)
    fake.write(3)
    slots, count = reader.read()
    assert (count, payloads(slots), reader.skipped) == (1, [3], 2)


def test_records_journaled_before_a_kill_are_passed_over_at_the_next_start(ring, tmp_path):
    """The reader keeps what it read until the journal holds it: killed between the append
    and the release, the next start finds the same records at the head of the buffer and
    passes over exactly those the journal's last frame holds, never a record more."""
    fake, reader = ring
    for n in (1, 2, 3):
        fake.write(n)
    slots, count = reader.read(release=False)
    assert reader.read(release=False) == (slots, count)  # still there, read again
    journal = Journal(tmp_path / "journal", 1 << 30)
    journal.open()
    journal.append(Frame(0, count, SLOT, HEADER, RECORD, 0, slots))
    journal.close()  # killed here: never released
    fake.write(4)
    again = Journal(tmp_path / "journal", 1 << 30)
    again.open()
    restarted = RingReader(fake.fd, SIZE, RECORD)
    try:
        assert restarted.skip_journaled(again.last_frame()) == 3
        slots, count = restarted.read()
        assert (count, payloads(slots)) == (1, [4])
        assert restarted.skip_journaled(again.last_frame()) == 0  # nothing of it is left
    finally:
        restarted.close()


def test_a_journal_frame_that_is_not_the_buffers_head_passes_nothing_over(ring, tmp_path):
    fake, reader = ring
    fake.write(7)
    journal = Journal(tmp_path / "journal", 1 << 30)
    journal.open()
    other = bytes(SLOT)  # a frame of other records (an earlier ring buffer's)
    journal.append(Frame(0, 1, SLOT, HEADER, RECORD, 0, other))
    assert reader.skip_journaled(journal.last_frame()) == 0
    assert reader.skip_journaled(None) == 0
    slots, count = reader.read()
    assert (count, payloads(slots)) == (1, [7])
