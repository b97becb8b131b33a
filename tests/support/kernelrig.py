"""A capture stage on a Lab's client veth, with the test playing the policy stage.

The test binds enrich's inbox itself to read raw_events, and programs the pinned maps
through KernelRuleMaps, as the policy stage would.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import zmq

from pipeline import messages
from pipeline.kernel import libbpf
from pipeline.kernel.loader import Attachment, detach_instance
from pipeline.kernel.maps import KernelRuleMaps, pins_present
from pipeline.rulemaps import ALLOW, DENY
from pipeline.settings import Settings
from pipeline.topology import inbox_address
from tests.support.netns import Lab, base_env
from tests.support.wait import wait_for


HASH_MAP = 1  # enum bpf_map_type


def create_map(map_type: int, key_size: int, value_size: int, entries: int,
               name: bytes = b"sluice_test") -> int:
    """A BPF map of the test's own (an fd the caller closes)."""
    create = libbpf.lib().bpf_map_create
    create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                       ctypes.c_uint32, ctypes.c_void_p]
    create.restype = ctypes.c_int
    fd = create(map_type, name, key_size, value_size, entries, None)
    assert fd >= 0, os.strerror(-fd)
    return fd


class CaptureRig:
    def __init__(self, lab: Lab, tmp_path: Path, ctx: zmq.Context, mode: str = "enforce",
                 **settings: str) -> None:
        self.lab = lab
        self.run_dir = tmp_path / "run"
        self.bpf_dir = Path(f"/sys/fs/bpf/sluice-t{lab.tag}")
        self.env = base_env(SLUICE_INTERFACE=lab.client_if, SLUICE_RUN_DIR=str(self.run_dir),
                            SLUICE_JOURNAL_DIR=str(tmp_path / "journal"),
                            SLUICE_BPF_DIR=str(self.bpf_dir), SLUICE_MODE=mode,
                            SLUICE_COUNTER_INTERVAL="0.5", SLUICE_CGROUP=str(lab.cgroup.path),
                            **settings)
        self.settings = Settings.from_env(self.env)
        self.ctx = ctx  # the zmq_context fixture's
        self.inbox = None
        self.proc = None
        self.maps = None
        self.events: list = []

    def start(self, default_action: int = DENY, program=None) -> CaptureRig:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.bind(inbox_address(self.run_dir, "enrich"))
        self.proc = self.lab.spawn_in_client_net(
            [sys.executable, "-m", "pipeline.cli.app", "run", "capture"], self.env,
            stderr=subprocess.PIPE, text=True)
        wait_for(lambda: pins_present(self.bpf_dir) or self.proc.poll() is not None,
                 "pinned maps", timeout=30)
        assert self.proc.poll() is None, self.proc.stderr.read()
        self.maps = KernelRuleMaps(self.bpf_dir)
        if program:
            program(self.maps)
        self.maps.set_config(default_action, self.settings.audit_mode, 1)
        wait_for(lambda: (self.run_dir / "capture.ready").exists(), "capture ready", timeout=10)
        return self

    def receive(self, predicate, timeout: float = 5.0, what: str = "events"):
        """Collect raw events until predicate(all events so far) is true."""
        def poll():
            while self.inbox.poll(50):
                kind, records, bad = messages.decode(self.inbox.recv())
                assert kind == "raw_events" and bad == 0
                self.events.extend(records)
            return predicate(self.events)
        return wait_for(poll, what, timeout=timeout, interval=0)

    def counters(self) -> dict:
        return json.loads((self.run_dir / "capture.counters.json").read_text())["counters"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(10)
        if self.maps:
            self.maps.close()
            self.maps = None
        return rc

    def close(self) -> None:
        try:
            if self.proc and self.proc.poll() is None:
                self.stop()
        finally:
            if self.maps:
                self.maps.close()
            if self.inbox is not None:
                self.inbox.close(0)
            detach_instance(self.settings)
            assert not self.bpf_dir.exists()


__all__ = ["CaptureRig", "ALLOW", "DENY", "Attachment"]
