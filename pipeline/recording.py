"""Recordings: everything that entered enrich, in arrival order, for `sluice replay`.

The file format is schemas/recording.json. In short: one header line

    sluice-recording 1 {"host": "...", "mode": "audit", "created_ns": 1767225600000000000}

then frames, each an 8-byte head (payload length and CRC-32 of the payload, both unsigned
32-bit big-endian) and a msgpack payload [arrival_ns, kind, v, [record, ...]] where each
record is the positional array of its message kind (raw_events or dns_mappings).

The file is only ever appended to. A crash can cut the last frame short: a reader skips it
with a warning, and a recorder that opens the file again cuts it off before appending.
At SLUICE_RECORD_MAX_BYTES the file is renamed PATH.<n> (the next free number) and a new one
is started, so the newest frames are always in PATH; rotated files are kept.

Recorder is what enrich holds: frames are buffered in memory and written on the loop's tick
(or once the buffer is large), so recording costs enrich one msgpack encoding per batch.
A failing disk never stops enrich: the frames are dropped, counted and logged once per error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import msgpack

from . import limited, messages, private
from .errors import MessageError, StoreError

log = logging.getLogger("sluice.recording")

MAGIC = b"sluice-recording"
VERSION = 1
MAX_HEADER = 4096
FRAME_HEAD = struct.Struct(">II")  # payload length, CRC-32 of the payload
MAX_PAYLOAD = 64 * 1024 * 1024
FLUSH_BYTES = 1024 * 1024  # write before the tick when a flood fills the buffer this far
RECORDED_KINDS = ("raw_events", "dns_mappings")


class RecordingError(StoreError):
    """A file that is not a readable recording (or cannot be written as one)."""


@dataclasses.dataclass(frozen=True)
class Header:
    host: str
    mode: str
    created_ns: int

    def line(self) -> bytes:
        meta = json.dumps(dataclasses.asdict(self), separators=(",", ":"))
        return b"%s %d %s\n" % (MAGIC, VERSION, meta.encode())

    def problem(self) -> str | None:
        """Why a header read from a file cannot be used (schemas/recording.json), or None."""
        if type(self.host) is not str or len(self.host) > 255:
            return "host is not a name"
        if self.mode not in ("audit", "enforce"):
            return "mode is not audit or enforce"
        if type(self.created_ns) is not int or not 0 <= self.created_ns < 1 << 63:
            return "created_ns is not a time"
        return None


@dataclasses.dataclass(slots=True)
class Frame:
    arrival_ns: int
    kind: str
    records: list


def encode_frame(kind: str, records: list, arrival_ns: int) -> bytes:
    payload = msgpack.packb(
        [arrival_ns, kind, messages.REGISTRY[kind].VERSION, [r.to_wire() for r in records]],
        use_bin_type=True)
    return FRAME_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


# ---------------------------------------------------------------- reading

def read_header(f: BinaryIO, name: str) -> Header:
    line = f.readline(MAX_HEADER)
    match = re.fullmatch(rb"%s (\d+) (\{.*\})\n" % MAGIC, line)
    if match is None:
        raise RecordingError(f"{name}: not a sluice recording")
    if int(match.group(1)) != VERSION:
        raise RecordingError(f"{name}: recording format {int(match.group(1))}, this sluice "
                             f"reads format {VERSION}")
    try:
        fields = limited.loads(match.group(2), max_depth=2)
        header = Header(**fields) if type(fields) is dict else None
    except (limited.LimitError, TypeError) as err:
        raise RecordingError(f"{name}: bad recording header: {err}") from None
    problem = header.problem() if header is not None else "not a JSON object"
    if problem or header is None:
        raise RecordingError(f"{name}: bad recording header: {problem}")
    return header


def _torn_tail(f: BinaryIO, start: int) -> bool:
    """Whether a bad frame at start is where writing stopped: the file ends with it, or only
    zero bytes follow (what some file systems leave of a write cut by a power loss)."""
    if not f.read(1):
        return True
    f.seek(start)
    while chunk := f.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return False
    return True


def payloads(f: BinaryIO, name: str) -> Iterator[tuple[int, bytes]]:
    """(end offset, payload) of each whole frame after the header. A cut or torn last frame
    ends the iteration with a warning; damage before the end is a RecordingError."""
    while True:
        start = f.tell()
        head = f.read(FRAME_HEAD.size)
        if not head:
            return
        length, crc = FRAME_HEAD.unpack(head) if len(head) == FRAME_HEAD.size else (0, 0)
        payload = f.read(length) if 0 < length <= MAX_PAYLOAD else b""
        if payload and len(payload) == length and zlib.crc32(payload) == crc:
            yield f.tell(), payload
            continue
        if not _torn_tail(f, start):
            raise RecordingError(f"{name}: damaged frame at byte {start}")
        log.warning("%s: skipping a cut last frame at byte %d (the recorder stopped mid-write)",
                    name, start)
        return


RAW_FIELDS_V1 = 12  # raw_events v1: up to packets; v2 added event_id and seq, v3 cgroup


def _fresh_raw_event(values: list, version: int) -> list:
    """A recorded kernel event, replayed, is a new event: its journal number and event id
    (absent before raw_events v2) are cleared, so the stages give it new ones; its cgroup
    (absent before v3) is kept."""
    cgroup = values[RAW_FIELDS_V1 + 2] if version >= 3 and len(values) > RAW_FIELDS_V1 + 2 else ""
    return values[:RAW_FIELDS_V1] + ["", 0, cgroup]


def decode_frame(payload: bytes, name: str, offset: int = 0) -> Frame:
    """The frame of a payload, every record checked as the enrich inbox checks it;
    RecordingError naming the file and the frame's byte offset otherwise."""
    try:
        frame = msgpack.unpackb(payload, raw=False)  # nesting: msgpack's own stack limit
        if type(frame) is not list or len(frame) != 4:
            raise MessageError("not an array of arrival_ns, kind, v and records")
        arrival_ns, kind, version, rows = frame
        if type(arrival_ns) is not int or not 0 <= arrival_ns < 1 << 63:
            raise MessageError("arrival_ns is not a time")
        cls = messages.REGISTRY[kind] if kind in RECORDED_KINDS else None
        oldest = 1 if kind == "raw_events" else getattr(cls, "VERSION", 0)
        if cls is None or type(version) is not int or not oldest <= version <= cls.VERSION:
            raise MessageError(f"{kind!r:.40} v{version!r:.20} is not a recorded kind this "
                               "sluice reads")
        if type(rows) is not list or not all(type(values) is list for values in rows):
            raise MessageError("records is not an array of arrays")
        if kind == "raw_events":
            rows = [_fresh_raw_event(values, version) for values in rows]
        return Frame(arrival_ns, kind, [cls.from_wire(values) for values in rows])
    except (ValueError, TypeError) as err:  # MessageError and msgpack's errors among them
        raise RecordingError(f"{name}: undecodable frame at byte {offset}: {err}") from None


class Recording:
    """A recording file opened for reading: its header, then its frames in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = open(path, "rb")
        except OSError as err:
            raise RecordingError(f"cannot read {path}: {err.strerror or err}") from None
        self.header = read_header(self.file, str(path))
        self.frames_start = self.file.tell()

    def frames(self) -> Iterator[Frame]:
        self.file.seek(self.frames_start)
        start = self.frames_start
        for end, payload in payloads(self.file, str(self.path)):
            yield decode_frame(payload, str(self.path), start)
            start = end

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def in_replay_order(paths: list[Path]) -> list[Path]:
    """Rotated segments in the order they were written: by their first frame's arrival."""
    def first_arrival(path: Path) -> int:
        with Recording(path) as recording:
            return next((f.arrival_ns for f in recording.frames()), recording.header.created_ns)

    return sorted(paths, key=first_arrival)


# ---------------------------------------------------------------- writing

def rotated_name(path: Path) -> Path:
    taken = [int(p.name[len(path.name) + 1:]) for p in path.parent.glob(f"{path.name}.*")
             if p.name[len(path.name) + 1:].isdigit()]
    return path.with_name(f"{path.name}.{max(taken, default=0) + 1}")


class RecordingWriter:
    """Appends frames to path, rotating at max_bytes. Raises OSError; Recorder handles it."""

    def __init__(self, path: Path, max_bytes: int, header: Header,
                 gid: int | None = None) -> None:
        self.path, self.max_bytes, self.header = path, max_bytes, header
        self.gid = gid  # SLUICE_GROUP's: new files are 0640 for it, else 0600
        self.fd = self._open_for_append()

    def _open_for_append(self) -> int:
        private.make_dirs(self.path.parent, self.gid)
        if self.path.exists() and self.path.stat().st_size:
            end = self._appendable_end()
            if end is not None:
                return self._append_at(end)
            # The old file keeps its own header (another host or mode) as a rotated segment.
            os.rename(self.path, rotated_name(self.path))
        return self._create()

    def _appendable_end(self) -> int | None:
        """Where the last whole frame of the existing file ends, if this recorder may append;
        RecordingError if the file is not a recording at all."""
        with open(self.path, "rb") as f:
            found = read_header(f, str(self.path))
            self.header_end = end = f.tell()
            if (found.host, found.mode) != (self.header.host, self.header.mode):
                return None
            try:
                for frame_end, _ in payloads(f, str(self.path)):
                    end = frame_end
            except RecordingError as err:
                log.warning("%s; starting a new file", err)
                return None
            return end

    def _append_at(self, end: int) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if os.fstat(fd).st_size > end:
            log.warning("%s: cutting a partial last frame (%d bytes) before appending",
                        self.path, os.fstat(fd).st_size - end)
            os.ftruncate(fd, end)
        self.size = end
        return fd

    def _create(self) -> int:
        # Raw traffic metadata: private (pipeline/private.py); O_EXCL: never someone's file.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     private.modes(self.gid)[1])
        private.own(fd, private.modes(self.gid)[1], self.gid)
        line = self.header.line()
        _write_all(fd, line)
        self.size = self.header_end = len(line)
        return fd

    def write(self, frames: list[bytes]) -> None:
        """Write whole frames, starting a new file before one would pass max_bytes."""
        chunk: list[bytes] = []
        chunk_size = 0
        for frame in frames:
            filled = self.size + chunk_size
            if filled + len(frame) > self.max_bytes and filled > self.header_end:
                self._write_chunk(chunk)
                chunk, chunk_size = [], 0
                self._rotate()
            chunk.append(frame)
            chunk_size += len(frame)
        self._write_chunk(chunk)

    def _write_chunk(self, chunk: list[bytes]) -> None:
        data = b"".join(chunk)
        _write_all(self.fd, data)
        self.size += len(data)

    def _rotate(self) -> None:
        os.close(self.fd)
        target = rotated_name(self.path)
        os.rename(self.path, target)
        log.info("recording reached %d bytes: continued in a new %s, earlier frames in %s",
                 self.max_bytes, self.path, target)
        self.header = dataclasses.replace(self.header, created_ns=time.time_ns())
        self.fd = self._create()

    def close(self) -> None:
        os.close(self.fd)


def _write_all(fd: int, data: bytes) -> None:
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.write(fd, view[done:])


class NoRecorder:
    """What enrich holds when SLUICE_RECORD is empty."""

    def add(self, kind: str, records: list) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Recorder(NoRecorder):
    """Buffers what enters enrich and writes it on flush; never raises into the stage."""

    def __init__(self, writer: RecordingWriter, counters, stage_log: logging.Logger,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.writer, self.counters, self.log, self.clock = writer, counters, stage_log, clock
        self.frames: list[bytes] = []
        self.records = 0
        self.buffered = 0
        self.complaints: set[str] = set()

    def add(self, kind: str, records: list) -> None:
        if kind not in RECORDED_KINDS or not records:
            return
        frame = encode_frame(kind, records, self.clock())
        self.frames.append(frame)
        self.records += len(records)
        self.buffered += len(frame)
        if self.buffered >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.frames:
            return
        frames, records = self.frames, self.records
        self.frames, self.records, self.buffered = [], 0, 0
        try:
            self.writer.write(frames)
        except OSError as err:
            self.counters.add("recording_errors")
            self.counters.add("recording_dropped", records)
            reason = err.strerror or str(err)
            if reason not in self.complaints:
                self.complaints.add(reason)
                self.log.warning("cannot write recording %s, dropping what it missed (counted "
                                 "as recording_dropped): %s", self.writer.path, reason)
            return
        self.counters.add("recorded", records)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.writer.close()


def open_recorder(settings, counters, stage_log: logging.Logger) -> NoRecorder:
    """The recorder SLUICE_RECORD asks for; RecordingError (one line) if it cannot start."""
    if settings.record is None:
        return NoRecorder()
    header = Header(settings.host_name, settings.mode, time.time_ns())
    try:
        writer = RecordingWriter(settings.record, settings.record_max_bytes, header,
                                 settings.gid)
    except OSError as err:
        raise RecordingError(f"SLUICE_RECORD={settings.record}: "
                             f"{err.strerror or err}") from None
    stage_log.info("recording what enters enrich to %s (rotated at %d bytes)", settings.record,
                   settings.record_max_bytes)
    return Recorder(writer, counters, stage_log)
