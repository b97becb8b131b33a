import os
import platform
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--require-kernel", action="store_true", default=False,
                     help="turn skips of kernel and end-to-end tests into failures (CI sets this)")


def pytest_report_header(config):
    try:
        import bcc  # noqa: F401
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


@pytest.fixture(scope="session")
def kernel(request):
    """Gate for kernel and end-to-end tests: skip where they cannot run, fail in CI."""
    reason = _kernel_unavailable()
    if reason:
        if request.config.getoption("--require-kernel"):
            pytest.fail(f"kernel tests required but cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture
def lab(kernel):
    from tests.netns import Lab

    lab = Lab()
    try:
        lab.create()
        yield lab
    finally:
        lab.close()
