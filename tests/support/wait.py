"""The one way a test waits for something to become true."""

from __future__ import annotations

import time


def wait_for(predicate, what: str, *, timeout: float = 10.0, interval: float = 0.02):
    """Poll until predicate() is truthy and return its value; after timeout seconds fail with
    an AssertionError naming what (never hang). timeout is keyword-only, so a call cannot
    mix it up with what."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
