"""When a stopping stage has taken all its upstream stages will send: stages stop in the
pipeline's order (pure: no I/O, no clock; the loop reads the stages' markers).

honcho (and systemd) signal every stage at once. A stage that ended as soon as its inbox was
quiet for a moment ended before the records its upstream sends at a stop had reached it:
capture's claims of every flow's pending packets, enrich's held events, the end of a burst.
Those waited in capture's journal for a next start, which a CI runner thrown away after the
job never has. So a stage that stops sends a feed end (events.FeedEnd) last on each feed to
a running stage, and a stage downstream ends once every upstream that is stopping has sent
it: ZeroMQ keeps one sender's messages in order, so all it sent came before.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

QUIET_S = 0.3  # an upstream that sends no feed end (not stopping, or gone): inbox quiet this long


class Upstream(enum.Enum):
    RUNNING = "running"    # not stopping: what it sends meanwhile is taken until a quiet moment
    STOPPING = "stopping"  # its last records and its feed end are on their way: wait for them
    ENDED = "ended"        # its feed end arrived, so everything it sent before did too
    GONE = "gone"          # not running (never started, failed, killed): nothing more comes


def upstream_state(ready_pid: int | None, stopping_pid: int | None,
                   ended_pid: int | None) -> Upstream:
    """An upstream stage's state from its markers: the pid of its ready marker and of its
    stopping marker when that process is alive, and the pid its last feed end came from."""
    if ready_pid is None:
        return Upstream.GONE
    if ended_pid == ready_pid:
        return Upstream.ENDED
    if stopping_pid == ready_pid:
        return Upstream.STOPPING
    return Upstream.RUNNING


def inputs_ended(upstreams: Iterable[Upstream], quiet_s: float) -> bool:
    """Whether nothing more will come: no upstream still owes its feed end, and every one
    has ended or the inbox has been quiet for QUIET_S (for those that send none)."""
    states = set(upstreams)
    if Upstream.STOPPING in states:
        return False
    return states <= {Upstream.ENDED} or quiet_s >= QUIET_S
