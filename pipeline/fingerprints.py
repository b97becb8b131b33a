"""A set of strings kept as 8-byte fingerprints in one flat array.

notify remembers every destination it has alerted on, and a scan brings hundreds of
thousands of them: as a Python set of str that is about 100 bytes a key (29 MiB for the
flood benchmark's 300,000), here it is 12 to 24 bytes a key, in one allocation.

A key's fingerprint is its own 64-bit hash (SipHash, seeded per process unless
PYTHONHASHSEED says otherwise). Two keys share one with a chance of about n²/2⁶⁵, one in
35 million for a million keys, and then the second counts as present. For "alerted
already" that is one alert missed in that many floods; the store, which keeps every key
as text, is not affected.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

_EMPTY, _GONE = 0, 1       # slot markers; fingerprints start at 2
_MIN_SLOTS = 1024          # a power of two
_MASK64 = (1 << 64) - 1


def _fingerprint(key: str) -> int:
    value = hash(key) & _MASK64
    return value if value > _GONE else value + 2


class FingerprintSet:
    """add / discard / `in` for str keys; open addressing with linear probing, at most
    two thirds of the slots filled (a discarded key leaves a marker until the next
    rehash)."""

    __slots__ = ("_slots", "_mask", "_live", "_filled")

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._empty(_MIN_SLOTS)
        for key in keys:
            self.add(key)

    def __len__(self) -> int:
        return self._live

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._find(_fingerprint(key)) >= 0

    def add(self, key: str) -> bool:
        """True when the key was not in the set. One pass along the key's run: it ends at
        the key or at an empty slot, and the first free slot on the way takes the key."""
        fingerprint = _fingerprint(key)
        slots, mask = self._slots, self._mask
        index, free = fingerprint & mask, -1
        while True:
            found = slots[index]
            if found == fingerprint:
                return False
            if found == _EMPTY:
                break
            if found == _GONE and free < 0:
                free = index
            index = (index + 1) & mask
        if free >= 0:
            slots[free] = fingerprint
            self._live += 1
        elif (self._filled + 1) * 3 > len(slots) * 2:
            self._rehash()
            self._place(fingerprint)
        else:
            slots[index] = fingerprint
            self._filled += 1
            self._live += 1
        return True

    def discard(self, key: str) -> None:
        index = self._find(_fingerprint(key))
        if index >= 0:
            self._slots[index] = _GONE
            self._live -= 1

    def _find(self, fingerprint: int) -> int:
        slots, mask = self._slots, self._mask
        index = fingerprint & mask
        while True:
            found = slots[index]
            if found == fingerprint:
                return index
            if found == _EMPTY:
                return -1
            index = (index + 1) & mask

    def _place(self, fingerprint: int) -> None:
        """Into the first free slot of its run (a discarded one is free); not present."""
        slots, mask = self._slots, self._mask
        index = fingerprint & mask
        while slots[index] > _GONE:
            index = (index + 1) & mask
        if slots[index] == _EMPTY:
            self._filled += 1
        slots[index] = fingerprint
        self._live += 1

    def _empty(self, size: int) -> None:
        self._slots = array("Q", [_EMPTY]) * size  # no zeroed bytes object beside it
        self._mask = size - 1
        self._live = self._filled = 0

    def _rehash(self) -> None:
        """Half the slots free after it (and markers of discarded keys dropped)."""
        old = self._slots
        size = _MIN_SLOTS
        while size < (self._live + 1) * 2:
            size *= 2
        self._empty(size)
        for fingerprint in old:  # one at a time: no list of the old keys beside the array
            if fingerprint > _GONE:
                self._place(fingerprint)
