"""Read a BPF ring buffer directly through its memory mapping, a whole burst at a time.

The kernel's layout (linux/kernel/bpf/ringbuf.c): page 0 holds the consumer position (the
reader writes it), page 1 the producer position, and the data pages follow, mapped twice
in a row so that a run of records that wraps around is still contiguous in memory. Each
record is an 8-byte header (length with a BUSY bit while the producer writes it and a
DISCARD bit, then a page offset) and the data, padded to 8 bytes.

Why not libbpf's callback per record: a flood brings hundreds of thousands of records a
second, and a Python call each is what used to let the buffer overflow. Here one drain
copies every finished slot as one bytes object, checked a column at a time (the header
bytes of every slot sliced with a stride), and the journal stores that run as it is.
"""

from __future__ import annotations

import mmap
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..journal import Frame

BUSY = 0x80000000
DISCARD = 0x40000000
HEADER = 8
_POS = struct.Struct("<Q")
_LEN = struct.Struct("<I")


def slot_size(record_size: int) -> int:
    """A record and its header, 8-aligned: the bytes one record takes in the buffer."""
    return (record_size + HEADER + 7) & ~7


def unread_records(map_fd: int, record_size: int) -> int:
    """Records between the consumer's and the producer's positions, left unconsumed."""
    page = mmap.PAGESIZE
    with mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0) as consumer, \
            mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page) as producer:
        consumed, produced = _POS.unpack_from(consumer)[0], _POS.unpack_from(producer)[0]
    return (produced - consumed) // slot_size(record_size)


class RingReader:
    """Consume one ring buffer map (by fd) of `size` data bytes (a power of two)."""

    def __init__(self, map_fd: int, size: int, record_size: int) -> None:
        if size & (size - 1):
            raise ValueError("ring buffer size must be a power of two")
        page = mmap.PAGESIZE
        self.size = size
        self.mask = size - 1
        self.slot = slot_size(record_size)
        self.record_size = record_size
        self.skipped = 0  # discarded records and records of another size stepped over
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        self._data = memoryview(self._producer)[page:]

    def close(self) -> None:
        self._data.release()
        self._producer.close()
        self._consumer.close()

    def read(self, limit: int = 1 << 30, *, release: bool = True) -> tuple[bytes, int]:
        """Take the finished records at the head of the buffer, at most about `limit` bytes:
        (slots, count), slots being `count` records of self.slot bytes each (header first).
        Discarded records and records of another size are stepped over and counted in
        self.skipped; a record still being written ends the run (the next read takes it).
        With release False the records stay in the buffer, for the next read to return
        again, until release() says how many of them are stored elsewhere."""
        while True:
            cons = _POS.unpack_from(self._consumer, 0)[0]
            prod = _POS.unpack_from(self._producer, 0)[0]
            available = min(prod - cons, limit - limit % self.slot, self.size)
            if available <= 0:
                return b"", 0
            start = cons & self.mask
            whole = available // self.slot
            ready = self._uniform_prefix(start, whole) if whole else 0
            if ready:
                slots = bytes(self._data[start:start + ready * self.slot])
                if release:
                    self._advance(cons + ready * self.slot)
                return slots, ready
            # The head was not a finished record of our size when the columns were read.
            # Its header is read once more and that one value decides: the producer may
            # have finished it in between, and then it is read, never stepped over.
            header = _LEN.unpack_from(self._data, start)[0]
            if header & BUSY:
                return b"", 0
            if header & DISCARD or header != self.record_size:
                self.skipped += 1
                self._advance(cons + (((header & ~DISCARD) + HEADER + 7) & ~7))
            elif not whole:
                return b"", 0  # less than a whole record written: never spin on it

    def _uniform_prefix(self, start: int, n: int) -> int:
        """How many slots from start are finished records of the expected size: checked on
        the header columns only, most significant byte first (the BUSY bit is there)."""
        slot, data = self.slot, self._data
        end = start + n * slot
        busy_column = bytes(data[start + 3:end:slot])
        ready = len(busy_column) - len(busy_column.lstrip(b"\0"))
        if not ready:
            return 0
        end = start + ready * slot
        expected = self.record_size.to_bytes(3, "little")
        for i in range(3):
            column = bytes(data[start + i:end:slot])
            ready = min(ready, len(column) - len(column.lstrip(bytes([expected[i]]))))
            end = start + ready * slot
        return ready

    def release(self, count: int) -> None:
        """Give the buffer back the room of the first count records read without release."""
        self._advance(_POS.unpack_from(self._consumer, 0)[0] + count * self.slot)

    def _advance(self, position: int) -> None:
        _POS.pack_into(self._consumer, 0, position)

    def skip_journaled(self, frame: Frame | None) -> int:
        """Release the records at the head of the buffer that frame, the journal's last,
        already holds: a reader killed after it journaled them but before it released them
        finds them here again at its next start. A frame of ring-buffer slots holds them
        byte for byte, kernel timestamps included, so only the same records compare equal
        (never those of a new buffer). The number released."""
        if frame is None or frame.stride != self.slot or frame.skip != HEADER:
            return 0
        slots, count = self.read(len(frame.payload), release=False)
        if count != frame.count or slots != frame.payload:
            return 0
        self.release(count)
        return count

    def pending(self) -> int:
        """Bytes written and not yet consumed."""
        return _POS.unpack_from(self._producer, 0)[0] - _POS.unpack_from(self._consumer, 0)[0]
