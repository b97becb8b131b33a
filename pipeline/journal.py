"""Capture's journal: every kernel record is written to disk before it travels.

The pipeline after capture keeps records only in memory, so a crash, kill -9 or a stop with
a backlog would lose them. Instead capture appends each drained batch here first, sends from
the journal, and persist marks in acknowledgement bitmaps which records it has stored. At
start, capture sends again what no bitmap marks; persist's event-id dedup makes it exactly
once. Segments whose records are all stored are deleted.

Layout of SLUICE_JOURNAL_DIR (created 0700, files 0600):

    journal.id        16 hex digits made with the directory: record i's event id is
                      "<id>-<i as 12 hex digits>", the same every time it is sent
    journal.next      the first segment index no run has used yet: numbers are never
                      given twice, even once every segment is deleted
    <index>.seg       a segment: records with sequence numbers in
                      [index * SEGMENT_RECORDS + 1, (index + 1) * SEGMENT_RECORDS]
    acks/<index>.ack  persist's bitmap of the segment's stored records (bit (seq - 1) % S)

A segment is a 24-byte head (magic, index, journal id) then frames. A frame is a 36-byte
head (payload length; CRC-32 of the rest of the head and the payload; first sequence number;
record count; the stride, offset and size of the records in the payload; the kernel's
monotonic-to-wall-clock offset) and the payload: `count` records `stride` bytes apart, each
`skip` bytes into its slot (capture journals ring-buffer slots as they are).

A started capture never appends to an old segment: it starts the next one, so a number is
never given to two records even when the old segment's tail was cut by a crash.
Reading stops at the first frame that is cut or fails its CRC: the rest of that segment is
skipped with a warning and counted. Nothing here raises on bad data; only the disk (full,
unwritable) raises JournalError, which capture counts while it goes on sending from memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import StoreError

log = logging.getLogger("sluice.journal")

SEGMENT_RECORDS = 65_536
READERS_KEPT = 2  # segments kept open for reading back: where each of the two cursors is
SEGMENT_MAGIC = b"SLUICEJ1"
SEGMENT_HEAD = struct.Struct("<8sQ8s")        # magic, index, journal id
# length, crc, first, count, stride, skip, size, pad, offset
FRAME_HEAD = struct.Struct("<IIQIHHHHq")
MAX_FRAME_PAYLOAD = 64 * 1024 * 1024
BITMAP_BYTES = SEGMENT_RECORDS // 8


class JournalError(StoreError):
    """The journal's disk failed (full, unwritable): records travel unjournaled meanwhile."""


@dataclasses.dataclass(slots=True)
class Frame:
    """One journaled batch: where its records are in the payload and what they are."""

    first_seq: int
    count: int
    stride: int
    skip: int
    record_size: int
    mono_to_wall_ns: int
    payload: bytes

    def record(self, i: int) -> bytes:
        start = i * self.stride + self.skip
        return self.payload[start:start + self.record_size]

    def encode(self) -> bytes:
        rest = FRAME_HEAD.pack(0, 0, self.first_seq, self.count, self.stride, self.skip,
                               self.record_size, 0, self.mono_to_wall_ns)[8:]
        crc = zlib.crc32(self.payload, zlib.crc32(rest))
        return struct.pack("<II", len(self.payload), crc) + rest + self.payload


def segment_of(seq: int) -> int:
    return (seq - 1) // SEGMENT_RECORDS


def bit_of(seq: int) -> int:
    return (seq - 1) % SEGMENT_RECORDS


def event_id(journal_id: str, seq: int) -> str:
    return f"{journal_id}-{seq:012x}"


def read_journal_id(directory: Path) -> str | None:
    try:
        text = (directory / "journal.id").read_text().strip()
    except OSError:
        return None
    return text if len(text) == 16 and all(c in "0123456789abcdef" for c in text) else None


# ---------------------------------------------------------------- acknowledgements

def ack_path(directory: Path, index: int) -> Path:
    return directory / "acks" / f"{index:010d}.ack"


def read_bitmap(directory: Path, index: int) -> bytearray:
    try:
        data = ack_path(directory, index).read_bytes()
    except OSError:
        return bytearray(BITMAP_BYTES)
    return bytearray(data[:BITMAP_BYTES].ljust(BITMAP_BYTES, b"\0"))


def is_marked(bitmap: bytes | bytearray, seq: int) -> bool:
    bit = bit_of(seq)
    return bool(bitmap[bit >> 3] & (1 << (bit & 7)))


def count_marked(bitmap: bytes | bytearray, first_seq: int, last_seq: int) -> int:
    lo, hi = bit_of(first_seq), bit_of(last_seq)
    whole = int.from_bytes(bitmap, "little") >> lo
    return (whole & ((1 << (hi - lo + 1)) - 1)).bit_count()


class Acks:
    """persist's side: marks stored sequence numbers, writes the touched bitmaps on flush.

    Marking is idempotent, so a record stored twice over (sent again after a crash) or a
    bitmap written late never counts wrong: capture only ever asks "is every bit set".
    """

    def __init__(self, directory: Path, journal_id: str) -> None:
        self.directory = directory
        self.journal_id = journal_id
        self.prefix = journal_id + "-"
        self.bitmaps: dict[int, bytearray] = {}
        self.touched: set[int] = set()

    @classmethod
    def open(cls, directory: Path | None) -> Acks | None:
        """The acknowledgements of the journal in directory, or None when there is none yet."""
        if directory is None:
            return None
        journal_id = read_journal_id(directory)
        return cls(directory, journal_id) if journal_id else None

    def mark_all(self, stored: Iterable[tuple[str, int]]) -> None:
        """Mark each (event id, journal number) stored, a run of consecutive numbers at a
        time: a flood's records come to persist in order, hundreds to a run."""
        prefix, first, last = self.prefix, 0, -1
        for event_id, seq in stored:
            if seq <= 0 or not event_id.startswith(prefix):
                continue  # not from this journal (dns, start-up scan, an older journal)
            if seq == last + 1 and (seq - 1) % SEGMENT_RECORDS:  # the run goes on
                last = seq
                continue
            if first:
                self._mark_run(first, last)
            first = last = seq
        if first:
            self._mark_run(first, last)

    def _mark_run(self, first: int, last: int) -> None:
        """Numbers first..last, all in one segment."""
        index = segment_of(first)
        bitmap = self.bitmaps.get(index)
        if bitmap is None:
            bitmap = self.bitmaps[index] = read_bitmap(self.directory, index)
        lo, hi = bit_of(first), bit_of(last)
        if hi - lo < 64:
            for bit in range(lo, hi + 1):
                bitmap[bit >> 3] |= 1 << (bit & 7)
        else:
            whole = int.from_bytes(bitmap, "little") | (((1 << (hi - lo + 1)) - 1) << lo)
            bitmap[:] = whole.to_bytes(len(bitmap), "little")
        self.touched.add(index)

    def flush(self) -> None:
        """Write every touched bitmap (atomically); JournalError when the disk refuses."""
        if not self.touched:
            return
        acks = self.directory / "acks"
        try:
            acks.mkdir(mode=0o700, exist_ok=True)
            for index in sorted(self.touched):
                if not (self.directory / f"{index:010d}.seg").exists():
                    self.bitmaps.pop(index, None)  # capture deleted it: all stored
                    continue
                path = ack_path(self.directory, index)
                tmp = path.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, self.bitmaps[index])
                finally:
                    os.close(fd)
                os.replace(tmp, path)
        except OSError as err:
            raise JournalError(f"cannot write journal acknowledgements in {acks}: "
                               f"{err.strerror or err}") from None
        self.touched.clear()


# ---------------------------------------------------------------- segments

@dataclasses.dataclass(slots=True)
class Segment:
    index: int
    path: Path
    size: int           # bytes of valid frames (and head)
    first_seq: int = 0  # 0 while empty
    last_seq: int = 0
    damaged: bool = False
    last_frame_at: int = 0  # offset of the last valid frame (0 while empty)

    @property
    def records(self) -> int:
        return self.last_seq - self.first_seq + 1 if self.first_seq else 0


@dataclasses.dataclass
class Cursor:
    """The next frame to read: a segment and a byte offset in it."""

    index: int
    offset: int = SEGMENT_HEAD.size


@dataclasses.dataclass
class Recovery:
    """What opening an existing journal found."""

    segments: int = 0
    frames: int = 0
    records: int = 0
    damaged_segments: int = 0
    damaged_bytes: int = 0


def _scan(path: Path, index: int, journal_id: bytes) -> tuple[Segment, int]:
    """A segment's valid extent; the bytes after it that are cut or corrupt."""
    with open(path, "rb") as f:
        data = f.read()
    segment = Segment(index, path, 0)
    if len(data) < SEGMENT_HEAD.size or SEGMENT_HEAD.unpack_from(data) != (
            SEGMENT_MAGIC, index, journal_id):
        segment.damaged = True
        return segment, len(data)
    offset = SEGMENT_HEAD.size
    for frame, end in _frames(data, offset):
        if segment.first_seq == 0:
            segment.first_seq = frame.first_seq
        segment.last_seq = frame.first_seq + frame.count - 1
        segment.last_frame_at, offset = offset, end
    segment.size = offset
    segment.damaged = offset != len(data)
    return segment, len(data) - offset


def _unstored_in(directory: Path, segment: Segment) -> int:
    """The records of a segment that persist has not marked stored."""
    bitmap = read_bitmap(directory, segment.index)
    return segment.records - count_marked(bitmap, segment.first_seq, segment.last_seq)


def unstored_records(directory: Path) -> int:
    """The records a journal holds that persist has not marked stored, read without changing
    anything (`sluice down`, after the stop); 0 when there is no journal. A segment that
    cannot be read is left out here; the next start skips it too, counted."""
    journal_id = read_journal_id(directory)
    if journal_id is None:
        return 0
    unstored = 0
    for path in directory.glob("*.seg"):
        try:
            segment, _ = _scan(path, int(path.stem), bytes.fromhex(journal_id))
        except (ValueError, OSError):
            continue
        if segment.records:
            unstored += _unstored_in(directory, segment)
    return unstored


def _frames(data: bytes, offset: int) -> Iterator[tuple[Frame, int]]:
    """Valid frames from offset on, each with the offset after it; stops at a bad one."""
    expected = 0
    while offset + FRAME_HEAD.size <= len(data):
        frame = decode_frame(data, offset)
        if frame is None or (expected and frame.first_seq != expected):
            return
        end = offset + FRAME_HEAD.size + len(frame.payload)
        expected = frame.first_seq + frame.count
        yield frame, end
        offset = end


def decode_frame(data: bytes | memoryview, offset: int) -> Frame | None:
    """The frame at offset, or None when it is cut, corrupt or impossible."""
    if offset + FRAME_HEAD.size > len(data):
        return None
    length, crc, first, count, stride, skip, size, _pad, shift = FRAME_HEAD.unpack_from(
        data, offset)
    start = offset + FRAME_HEAD.size
    if (length > MAX_FRAME_PAYLOAD or start + length > len(data) or first == 0 or count == 0
            or size == 0 or skip + size > stride or count * stride > length):
        return None
    payload = bytes(data[start:start + length])
    if zlib.crc32(payload, zlib.crc32(data[offset + 8:start])) != crc:
        return None
    if segment_of(first) != segment_of(first + count - 1):
        return None
    return Frame(first, count, stride, skip, size, shift, payload)


class Journal:
    """The writer (capture): append frames, read them back by cursor, delete stored segments."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segments: dict[int, Segment] = {}
        self.journal_id = ""
        self._id_bytes = b""
        self._fd: int | None = None
        # Segments open for reading back, oldest first: a frame is read back for every drain,
        # and opening its file each time cost a tenth of capture's CPU under a flood.
        self._readers: dict[int, int] = {}
        self.next_seq = 1
        self.recovered_until = 0  # segments below this index existed at start
        self.broken = ""          # why the directory cannot be used at all ("" = it can)

    # -- opening

    def open(self) -> Recovery:
        """Create or adopt the directory; scan what an earlier run left. JournalError if the
        directory cannot be used at all."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.journal_id = read_journal_id(self.directory) or self._new_id()
        except OSError as err:
            raise JournalError(f"cannot use journal directory {self.directory}: "
                               f"{err.strerror or err}") from None
        self._id_bytes = bytes.fromhex(self.journal_id)
        found = Recovery()
        for path in sorted(self.directory.glob("*.seg")):
            try:
                index = int(path.stem)
                segment, bad_bytes = _scan(path, index, self._id_bytes)
            except (ValueError, OSError) as err:
                log.warning("journal: skipping %s: %s", path.name, err)
                found.damaged_segments += 1
                continue
            self.segments[index] = segment
            found.segments += 1
            found.records += segment.records
            if segment.damaged:
                found.damaged_segments += 1
                found.damaged_bytes += bad_bytes
                log.warning("journal: %s is cut or corrupt after byte %d: %d byte(s) skipped "
                            "(counted as journal_damaged_bytes)", path.name, segment.size,
                            bad_bytes)
        for ack in (self.directory / "acks").glob("*.ack"):
            if ack.stem.isdigit() and int(ack.stem) not in self.segments:
                ack.unlink(missing_ok=True)  # its segment was deleted as persist wrote it
        last = max(self.segments, default=-1)
        # Never below a number an earlier run used: its segments may all be deleted by now,
        # while its records' event ids are in the store.
        self.recovered_until = max(last + 1, self._read_next_index())
        self.next_seq = self.recovered_until * SEGMENT_RECORDS + 1
        return found

    def _read_next_index(self) -> int:
        try:
            return int((self.directory / "journal.next").read_text())
        except (OSError, ValueError):
            return 0

    def _write_next_index(self, index: int) -> None:
        tmp = self.directory / "journal.next.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{index}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / "journal.next")

    def _new_id(self) -> str:
        journal_id = secrets.token_hex(8)
        tmp = self.directory / "journal.id.tmp"
        tmp.write_text(journal_id + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.directory / "journal.id")
        return journal_id

    # -- writing

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments.values())

    def fits(self, payload_bytes: int) -> bool:
        return self.size + FRAME_HEAD.size + payload_bytes + SEGMENT_HEAD.size <= self.max_bytes

    def room(self, count: int) -> int:
        """How many of count records the active segment can still take."""
        return min(count, SEGMENT_RECORDS - bit_of(self.next_seq))

    def append(self, frame: Frame) -> None:
        """Write frame (its first_seq is set here and it must fit in the active segment);
        JournalError on a disk failure, after which the numbers are not reused."""
        frame.first_seq = self.next_seq
        index = segment_of(frame.first_seq)
        assert segment_of(frame.first_seq + frame.count - 1) == index, "frame crosses a segment"
        self.next_seq += frame.count
        data = frame.encode()
        try:
            segment, fd = self._active(index)
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], segment.size + written)
        except OSError as err:
            self._close_active()  # the next append starts a fresh segment
            self.next_seq = (index + 1) * SEGMENT_RECORDS + 1
            failed = self.segments.get(index)
            if failed is not None and failed.records == 0:  # nothing in it: no file left
                self._delete(failed)
            raise JournalError(f"cannot write journal in {self.directory}: "
                               f"{err.strerror or err}") from None
        segment.last_frame_at = segment.size
        segment.size += len(data)
        if segment.first_seq == 0:
            segment.first_seq = frame.first_seq
        segment.last_seq = frame.first_seq + frame.count - 1

    def _active(self, index: int) -> tuple[Segment, int]:
        """The segment index, open for writing, and its descriptor."""
        segment = self.segments.get(index)
        if segment is not None and self._fd is not None:
            return segment, self._fd
        self._close_active()
        self._write_next_index(index + 1)  # first: a number on disk is a number used
        path = self.directory / f"{index:010d}.seg"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, SEGMENT_HEAD.pack(SEGMENT_MAGIC, index, self._id_bytes))
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd = fd
        segment = self.segments[index] = Segment(index, path, SEGMENT_HEAD.size)
        return segment, fd

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close_active()
        for index in list(self._readers):
            self._close_reader(index)

    def _reader(self, segment: Segment) -> int:
        """A descriptor segment is read back through; one per cursor (live and recovery)
        stays open."""
        fd = self._readers.get(segment.index)
        if fd is None:
            fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            self._readers[segment.index] = fd
            if len(self._readers) > READERS_KEPT:
                self._close_reader(next(iter(self._readers)))
        return fd

    def _close_reader(self, index: int) -> None:
        fd = self._readers.pop(index, None)
        if fd is not None:
            os.close(fd)

    # -- reading back

    def read(self, cursor: Cursor) -> Frame | None:
        """The frame at cursor, advancing it; None at the end of what is written (the cursor
        then stays, or moves on to the next segment when this one is finished)."""
        while True:
            segment = self.segments.get(cursor.index)
            if segment is None or cursor.offset >= segment.size:
                following = [i for i in self.segments if i > cursor.index]
                if not following:
                    return None  # the end of what is written: more may come here
                cursor.index, cursor.offset = min(following), SEGMENT_HEAD.size
                continue
            try:
                fd = self._reader(segment)
                head = os.pread(fd, FRAME_HEAD.size, cursor.offset)
                length = struct.unpack_from("<I", head)[0] if len(head) >= 4 else 0
                data = head + os.pread(fd, length, cursor.offset + FRAME_HEAD.size)
            except OSError as err:
                self._close_reader(segment.index)
                log.warning("journal: cannot read %s: %s", segment.path.name, err)
                data = b""
            frame = decode_frame(data, 0)
            if frame is None:
                cursor.offset = segment.size  # scanned as valid, unreadable now: skip the rest
                continue
            cursor.offset += FRAME_HEAD.size + len(frame.payload)
            return frame

    def last_frame(self) -> Frame | None:
        """The last frame written, by this run or (after open) an earlier one."""
        written = [i for i, segment in self.segments.items() if segment.last_frame_at]
        if not written:
            return None
        index = max(written)
        return self.read(Cursor(index, self.segments[index].last_frame_at))

    def at_end(self, cursor: Cursor) -> bool:
        """No frame after cursor yet."""
        segment = self.segments.get(cursor.index)
        if segment is not None and cursor.offset < segment.size:
            return False
        return not any(i > cursor.index for i in self.segments)

    # -- releasing

    def release(self) -> tuple[int, int]:
        """Delete finished segments whose every record persist has marked stored; returns
        (segments deleted, records still unstored in the journal)."""
        active = segment_of(self.next_seq)
        deleted = unstored = 0
        for index in sorted(self.segments):
            segment = self.segments[index]
            if segment.records == 0 and index != active:
                self._delete(segment)
                continue
            if segment.records == 0:
                continue
            left = _unstored_in(self.directory, segment)
            if left == 0 and index != active:
                self._delete(segment)
                deleted += 1
            else:
                unstored += left
        return deleted, unstored

    def _delete(self, segment: Segment) -> None:
        self._close_reader(segment.index)
        del self.segments[segment.index]
        segment.path.unlink(missing_ok=True)
        ack_path(self.directory, segment.index).unlink(missing_ok=True)
