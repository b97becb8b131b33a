"""What a test may not leave behind: an open ZeroMQ socket or a running thread."""

from __future__ import annotations

import threading
import time

import zmq


def terminate_or_fail(ctx: zmq.Context, threads_before: set[threading.Thread],
                      grace: float) -> None:
    """Terminate ctx and wait for the threads started since threads_before to end, each for
    at most grace seconds; an AssertionError names what is left instead of a hang (term()
    waits for every open socket, so it runs in a daemon thread)."""
    closer = threading.Thread(target=ctx.term, name="zmq-term", daemon=True)
    closer.start()
    closer.join(timeout=grace)
    assert not closer.is_alive(), "a ZeroMQ socket was left open"
    deadline = time.monotonic() + grace
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    leaked = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"
