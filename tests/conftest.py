import os
import platform
import sys
import threading

import hypothesis
import pytest
import zmq

from tests.support.leaks import terminate_or_fail
from tests.support.persistkit import Pusher
from tests.support.postgres import POSTGRES_URL_VARIABLE, postgres_schema, postgres_unavailable
from tests.support.stagekit import Peer

# Property tests: no example database in the tree, no per-example deadline on a busy machine,
# and a failure prints what reproduces it. Each test sets its own max_examples.
hypothesis.settings.register_profile("sluice", database=None, deadline=None, print_blob=True)
hypothesis.settings.load_profile("sluice")


def pytest_addoption(parser):
    parser.addoption("--require-kernel", action="store_true", default=False,
                     help="turn skips of kernel, end-to-end and PostgreSQL tests into failures "
                          "(CI sets this)")


def pytest_report_header(config):
    try:
        import bcc
        bcc_version = getattr(bcc, "__version__", "present")
    except Exception as err:  # noqa: BLE001 - any import failure means "no bcc"
        bcc_version = f"missing ({type(err).__name__})"
    return [f"kernel {platform.release()}, bcc {bcc_version}, euid {os.geteuid()}, "
            f"python {sys.version.split()[0]}"]


def _kernel_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs bcc (python3-bpfcc)"
    return ""


def skip_or_fail(request, what: str, reason: str) -> None:
    """Skip where a test cannot run; under --require-kernel (CI) that is a failure."""
    if reason:
        if request.config.getoption("--require-kernel"):
            pytest.fail(f"{what} tests required but cannot run: {reason}")
        pytest.skip(reason)


# ---------------------------------------------------------------- ZeroMQ

LEAK_GRACE_S = 5.0  # how long after a test its sockets may linger and its threads may run


@pytest.fixture
def zmq_context():
    """The test's ZeroMQ context. Afterwards it must terminate, and every thread the test
    started must end, within LEAK_GRACE_S each: a socket left open or a thread left running
    fails the test instead of hanging the suite."""
    threads_before = set(threading.enumerate())
    ctx = zmq.Context()
    yield ctx
    terminate_or_fail(ctx, threads_before, LEAK_GRACE_S)


@pytest.fixture
def peer(zmq_context, tmp_path):
    """The test's side of stages run under tmp_path/run (tests/support/stagekit.py: Peer)."""
    peer = Peer(tmp_path / "run", zmq_context)
    yield peer
    peer.close()


@pytest.fixture
def pusher(zmq_context):
    """Frames to persist's inbox (tests/support/persistkit.py: Pusher)."""
    pusher = Pusher(zmq_context)
    yield pusher
    pusher.close()


# ---------------------------------------------------------------- kernel and end to end

@pytest.fixture(scope="session")
def kernel(request):
    """Gate for kernel and end-to-end tests."""
    skip_or_fail(request, "kernel", _kernel_unavailable())


@pytest.fixture
def lab(kernel):
    from tests.support.netns import Lab

    lab = Lab()
    try:
        lab.create()
        yield lab
    finally:
        lab.close()


# ---------------------------------------------------------------- PostgreSQL for the store tests

@pytest.fixture(scope="session")
def postgres_url(request):
    """The test server's URL: skip where there is none, fail under --require-kernel (CI)."""
    url = os.environ.get(POSTGRES_URL_VARIABLE, "")
    skip_or_fail(request, "PostgreSQL", postgres_unavailable(url))
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database on each backend: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/audit.db"
        return
    with postgres_schema(request.getfixturevalue("postgres_url")) as url:
        yield url
