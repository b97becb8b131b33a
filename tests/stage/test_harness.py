"""The harness's own promises: a leaked socket or thread fails a test instead of hanging it,
and every test file sits in the directory of its level."""

import threading
from pathlib import Path

import pytest
import zmq

from tests.support.leaks import terminate_or_fail
from tests.support.wait import wait_for


def test_a_socket_left_open_fails_instead_of_hanging():
    before = set(threading.enumerate())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    with pytest.raises(AssertionError, match="a ZeroMQ socket was left open"):
        terminate_or_fail(ctx, before, grace=0.2)
    sock.close()  # lets the pending term() finish
    wait_for(lambda: ctx.closed, "the context to terminate")


def test_a_thread_left_running_fails():
    before = set(threading.enumerate())
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="left-running")
    thread.start()
    with pytest.raises(AssertionError, match="threads left running: .*left-running"):
        terminate_or_fail(zmq.Context(), before, grace=0.2)
    stop.set()
    thread.join()


def test_a_clean_test_passes(zmq_context):
    sock = zmq_context.socket(zmq.PUSH)
    sock.close()
    finished = threading.Thread(target=lambda: None)
    finished.start()
    finished.join()


def test_wait_for_returns_the_value_or_fails_naming_what():
    assert wait_for(lambda: 42, "the answer") == 42
    with pytest.raises(AssertionError, match="timed out after 0.1 s waiting for nothing"):
        wait_for(lambda: None, "nothing", timeout=0.1)
    with pytest.raises(TypeError):
        wait_for(lambda: 1, 5, "the old argument order")  # timeout is keyword-only


def test_every_test_file_sits_in_the_directory_of_its_level():
    tests = Path(__file__).resolve().parents[1]
    assert not list(tests.glob("test_*.py")), "a test file outside the level directories"
    levels = {path.parent.name for path in tests.glob("*/test_*.py")}
    assert levels == {"unit", "stage", "kernel", "e2e"}
