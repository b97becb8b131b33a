"""The policy a stage judges by, kept current: one loader and one reload path for every stage.

policy (the map writer), dns (the query filter) and enrich (the namer) all load the start-up
policy (pipeline/startup.py: the file or SLUICE_* form plus the auto-allows sluice
itself needs: the DNS upstream, cloud metadata, the CI preset's services), so the three agree
on every rule, the hostnames the namer tracks included. The file is watched (and reread on
SIGHUP); a policy that loads replaces the old one through the stage's `apply`, one that does
not is one log line and changes nothing. The counters `policy_reloads` and
`policy_reload_failures` say which happened (tests wait on them, not on log wording).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import PolicyError
from .loop import StageIO
from .policy.model import Policy
from .hostfiles import HostFiles
from .startup import load_startup_policy

CHECK_INTERVAL_S = 1.0


class PolicyWatch:
    """Tells a stage when its policy file changed; looks at most once per interval."""

    def __init__(self, path: Path, interval: float = CHECK_INTERVAL_S) -> None:
        self.path, self.interval = path, interval
        self.mtime = self._mtime()
        self.next_check = 0.0

    def changed(self, now: float) -> bool:
        if now < self.next_check:
            return False
        self.next_check = now + self.interval
        mtime = self._mtime()
        if mtime == self.mtime:
            return False
        self.mtime = mtime
        return True

    def seen(self) -> None:
        """The current file has been read (a reload on SIGHUP): no change to report."""
        self.mtime = self._mtime()

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0


class LivePolicy:
    """Loads the policy at set-up (a PolicyError there stops the stage) and reloads it when
    the file changes (`tick`) or on SIGHUP (`reload`). `apply(policy)` makes the stage use
    a new policy (the policy stage moves its maps there) before it becomes `current`."""

    def __init__(self, io: StageIO, apply: Callable[[Policy], None] = lambda policy: None,
                 files: HostFiles | None = None) -> None:
        self.io, self.apply = io, apply
        self.files = files or HostFiles()
        self.watch = PolicyWatch(io.settings.policy)
        self.current = self._load()

    def _load(self) -> Policy:
        return load_startup_policy(self.io.settings, self.files)

    def tick(self, now: float) -> None:
        if self.watch.changed(now):
            self.reload("the policy file changed")

    def reload(self, why: str) -> bool:
        self.watch.seen()
        try:
            policy = self._load()
        except PolicyError as err:
            self.io.log.error("policy not reloaded (%s), the previous one stays: %s", why, err)
            self.io.counters.add("policy_reload_failures")
            return False
        self.apply(policy)
        self.current = policy
        self.io.counters.add("policy_reloads")
        self.io.log.info("policy reloaded (%s): %r", why, policy)
        return True
