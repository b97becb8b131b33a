"""The bounded, expiring LRU behind the response cache and the learned CNAME targets."""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar


class Expiring(Protocol):
    @property
    def expires(self) -> float: ...


E = TypeVar("E", bound=Expiring)


class ExpiringLru(Generic[E]):
    """The least recently used entry leaves first when full; an entry met past its `expires`
    is dropped then (lazy expiry: nothing scans)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: collections.OrderedDict[Hashable, E] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def live(self, key: Hashable, now: float) -> E | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: E) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
