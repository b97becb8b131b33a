"""Run a stage in a thread on real ipc:// sockets under tmp_path, and talk to it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import zmq

from pipeline import messages
from pipeline.loop import run_stage
from pipeline.settings import Settings
from pipeline.topology import inbox_address
from tests.support.wait import wait_for


def stage_settings(tmp_path: Path, **env: str) -> Settings:
    values = {"SLUICE_RUN_DIR": str(tmp_path / "run"), "SLUICE_HOST": "test-host",
              "SLUICE_DB": f"sqlite:///{tmp_path}/audit.db",
              "SLUICE_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
              "SLUICE_JOURNAL_DIR": str(tmp_path / "journal"),
              "SLUICE_BPF_DIR": str(tmp_path / "no-bpffs"),
              "SLUICE_COUNTER_INTERVAL": "0.1", "SLUICE_FLUSH_INTERVAL": "0.05",
              # Stages in threads run in this machine's own network namespace: no redirect.
              "SLUICE_DNS_REDIRECT": "false"}
    values.update(env)
    return Settings.from_env(values)


class StageThread:
    """A stage object run by run_stage in a thread, stopped through its stop event."""

    def __init__(self, stage, settings: Settings) -> None:
        self.stage, self.settings = stage, settings
        self.stop = threading.Event()
        self.exit_code = None
        self.thread = threading.Thread(target=self._run, name=f"{stage.name}-under-test")

    def _run(self) -> None:
        self.exit_code = run_stage(self.stage, self.settings, stop=self.stop)

    def start(self, wait_ready: bool = True) -> StageThread:
        self.thread.start()
        if wait_ready:
            ready = self.settings.run_dir / f"{self.stage.name}.ready"
            wait_for(lambda: ready.exists() or not self.thread.is_alive(),
                     f"{self.stage.name} ready")
            assert self.thread.is_alive(), f"{self.stage.name} exited early: {self.exit_code}"
        return self

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), f"{self.stage.name} did not stop within 10 s"
        return self.exit_code

    def counters(self) -> dict:
        path = self.settings.run_dir / f"{self.stage.name}.counters.json"
        return json.loads(path.read_text())["counters"] if path.exists() else {}


class Peer:
    """The test's side: PUSH into a stage's inbox, PULL from the inbox it feeds."""

    def __init__(self, run_dir: Path, ctx: zmq.Context) -> None:
        """ctx: the zmq_context fixture's, which checks that every socket was closed."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.ctx = ctx
        self.sockets: list[zmq.Socket] = []

    def pusher(self, inbox: str, queue: int | None = None) -> zmq.Socket:
        """queue: messages the socket holds (its high-water mark), if not ZeroMQ's default."""
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        if queue is not None:
            sock.setsockopt(zmq.SNDHWM, queue)
        sock.connect(inbox_address(self.run_dir, inbox))
        self.sockets.append(sock)
        return sock

    def inbox(self, name: str, queue: int | None = None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        if queue is not None:
            sock.setsockopt(zmq.RCVHWM, queue)
        sock.bind(inbox_address(self.run_dir, name))
        self.sockets.append(sock)
        return sock

    @staticmethod
    def receive(sock: zmq.Socket, count: int, timeout: float = 5.0) -> list:
        """Records from sock until count arrived; asserts instead of hanging."""
        records: list = []
        deadline = time.monotonic() + timeout
        while len(records) < count:
            left = deadline - time.monotonic()
            assert left > 0 and sock.poll(int(left * 1000)), (
                f"got {len(records)} of {count} records before the timeout")
            _, good, _ = messages.decode(sock.recv())
            records.extend(good)
        return records

    def close(self) -> None:
        """Close the sockets made here (again is harmless); the fixture terminates ctx."""
        for sock in self.sockets:
            sock.close()
