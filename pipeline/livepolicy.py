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
    """Tells a stage when its policy file changed since it was last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mtime = self._mtime()

    def changed(self) -> bool:
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
    the file changes (looked at once per CHECK_INTERVAL_S on the stage's reactor) or on
    SIGHUP (`reload`). `apply(policy)` makes the stage use a new policy (the policy stage
    moves its maps there) before it becomes `current`."""

    def __init__(self, io: StageIO, apply: Callable[[Policy], None] = lambda policy: None,
                 files: HostFiles | None = None) -> None:
        self.io, self.apply = io, apply
        self.files = files or HostFiles()
        self.watch = PolicyWatch(io.settings.policy)
        self.current = self._load()
        io.reactor.after(CHECK_INTERVAL_S, self._look)

    def _load(self) -> Policy:
        return load_startup_policy(self.io.settings, self.files)

    def _look(self) -> None:
        if self.watch.changed():
            self.reload("the policy file changed")
        self.io.reactor.after(CHECK_INTERVAL_S, self._look)

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
