"""Which (name, address) pairs the policy stage has confirmed open, under which map generation.

Every answer with addresses waits for the policy stage to write them into the maps (design
invariant 2). Once it has said ok for a name and its addresses, a later answer for the same
name with no other address (a cache hit, mostly) is already open, and can leave without
another round trip. That holds only while the maps stay as they were: the policy stage bumps
map_config.generation after it programs them, at start and after every reload, and a reload
may have removed entries. So the memory belongs to one generation, and seeing any other one
forgets every pair.

A confirmation counts under the generation read when its request was sent, not when the ok
came back: a reload that ran in between may have undone the write, and reading later would
file the pair under the new generation as if it had survived. No generation (no pinned maps,
or maps not programmed yet) confirms nothing, so every answer then asks. A reload still
under way (entries moved, generation not yet bumped) can only have removed what the new
policy no longer allows (the firewall moves by a diff that never closes what both policies
allow): the same race a round trip has with a reload right after its ok.

The pairs sit in a bounded LRU (CAPACITY); the generation is opaque here, compared only.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterable, Sequence

# Four addresses for each of the response cache's 10,000 answers; about 135 bytes a pair
# (the key tuple and its OrderedDict entry; names and addresses are shared with the
# answers), so under 6 MB when full.
CAPACITY = 40_000


class ConfirmedOpen:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.generation: Hashable | None = None
        self.pairs: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.pairs)

    def covers(self, name: str, ips: Sequence[str], generation: Hashable | None) -> bool:
        """Are all of ips confirmed open for name at generation, the one current now?"""
        self._observe(generation)
        if generation is None or not all((name, ip) in self.pairs for ip in ips):
            return False
        for ip in ips:
            self.pairs.move_to_end((name, ip))
        return True

    def confirm(self, name: str, ips: Iterable[str], generation: Hashable | None) -> None:
        """The policy stage said ok to a request sent at generation. Kept only if that is
        still the latest generation seen; the least recently used pairs leave when full."""
        if generation is None or generation != self.generation:
            return
        for ip in ips:
            self.pairs[(name, ip)] = None
            self.pairs.move_to_end((name, ip))
        while len(self.pairs) > self.capacity:
            self.pairs.popitem(last=False)

    def _observe(self, generation: Hashable | None) -> None:
        if generation != self.generation:
            self.pairs.clear()
            self.generation = generation
