"""How much of one CPU a thread may take ahead of every ordinary one (pure: the time and the
thread's CPU time are passed in).

The DNS proxy's own thread runs real-time, so a flood that fills every core does not stand
between a client and its answer. Its work comes only from clients' queries, but a client can
send many: within each window the thread may use at most its share of one CPU real-time, and
past that it runs as an ordinary thread until the next window begins. A query flood thus
takes at most that share ahead of capture's drain and the audit path.
"""

from __future__ import annotations


class RealtimeShare:
    def __init__(self, share: float, window_s: float) -> None:
        if not 0 < share < 1 or window_s <= 0:
            raise ValueError(f"a real-time share needs 0 < share < 1 and a window: "
                             f"{share}, {window_s}")
        self.window_s = window_s
        self.budget_s = share * window_s
        self.window_start: float | None = None
        self.cpu_at_start = 0.0

    def allows(self, now: float, cpu_s: float) -> bool:
        """Whether the thread may run real-time now, having used cpu_s of CPU in all."""
        if self.window_start is None or now - self.window_start >= self.window_s:
            self.window_start, self.cpu_at_start = now, cpu_s
        return cpu_s - self.cpu_at_start < self.budget_s

    def renews_in(self, now: float) -> float:
        """Seconds until the next window, when the share is whole again."""
        if self.window_start is None:
            return 0.0
        return max(0.0, self.window_start + self.window_s - now)
