"""Typed errors and the exit codes they map to: the one table of what sluice's exits mean.

A SluiceError's class names its exit code; the CLI, the stage loop and `sluice run` all turn
one into `sluice: <message>` on stderr and that code (report). The README lists the same.
"""

from __future__ import annotations

import enum
import sys


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1            # a check found problems, or the command could not do its work
    BAD_INPUT = 2         # a setting, option or input file is wrong; nothing was changed
    POLICY = 3            # the policy does not load
    STAGE_FAILED = 3      # up, wait-ready, down: a stage or a requested layer failed
    KERNEL = 4            # a kernel feature is missing, or a load or attach failed
    TIMED_OUT = 4         # up, wait-ready: the pipeline was not on in time
    STORE = 5             # the audit store or log cannot be opened or written
    DNS_LISTEN = 6        # the DNS proxy cannot listen where it is told to
    WORKER_DIED = 7       # a stage's helper thread died
    UNEXPECTED_BLOCK = 8  # down, report with the gate: a block the expected list lacks


class SluiceError(Exception):
    """An error a user can act on; str(err) is the whole message, one line."""

    exit_code: int = ExitCode.FAILED


class SettingsError(SluiceError):
    exit_code = ExitCode.BAD_INPUT


class PolicyError(SluiceError):
    exit_code = ExitCode.POLICY


class KernelError(SluiceError):
    """A missing kernel feature or a failed load/attach."""

    exit_code = ExitCode.KERNEL


class StoreError(SluiceError):
    exit_code = ExitCode.STORE


def report(err: SluiceError) -> int:
    """Say err in sluice's one line on stderr; the exit code it maps to."""
    print(f"sluice: {err}", file=sys.stderr)
    return int(err.exit_code)


class MessageError(ValueError):
    """A message on a socket that does not match its schema (counted, never fatal).

    `reason` is the stable part (what is logged once); `detail` the offending value."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
