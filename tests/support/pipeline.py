"""The whole pipeline for end-to-end tests: the real Procfile under `honcho start` in a lab's
client namespace, its JSONL lines and SQL rows, and the cgroup hooks it attached."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.support.netns import ROOT, Lab, base_env, sh

VENV_BIN = str(Path(sys.executable).parent)


class Pipeline:
    """honcho start of the real Procfile in the lab's client namespace."""

    def __init__(self, lab: Lab, tmp_path: Path, policy: dict, mode: str = "enforce") -> None:
        self.lab = lab
        self.tmp = tmp_path
        (tmp_path / "policy.json").write_text(json.dumps(policy))
        self.env = base_env(
            PATH=f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", SLUICE_MODE=mode,
            SLUICE_INTERFACE=lab.client_if, SLUICE_RUN_DIR=str(tmp_path / "run"),
            SLUICE_BPF_DIR=f"/sys/fs/bpf/sluice-e{lab.tag}",
            SLUICE_DB=f"sqlite:///{tmp_path}/audit.db",
            SLUICE_AUDIT_LOG=str(tmp_path / "audit.jsonl"),
            SLUICE_JOURNAL_DIR=str(tmp_path / "journal"),
            SLUICE_POLICY=str(tmp_path / "policy.json"), SLUICE_COUNTER_INTERVAL="1",
            SLUICE_HOST="e2e-host", SLUICE_CGROUP=str(lab.cgroup.path))
        self.proc = None
        self.host_mounts = False  # see Lab.in_client_net

    def sluice(self, *args: str, netns: bool = False, timeout: float = 60):
        prefix = self.lab.in_client_net(self.host_mounts) if netns else []
        return subprocess.run([*prefix, f"{VENV_BIN}/sluice", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, **kw) -> Pipeline:
        self.log = open(self.tmp / "honcho.log", "w")
        try:
            self.proc = self.lab.start_pipeline(self.env, self.log, self.host_mounts, **kw)
        except RuntimeError as err:
            raise AssertionError(f"{err}\n{self.output()}") from None
        return self

    def hook_ids(self) -> set[str]:
        """Program ids of this instance's cgroup hooks (while it runs)."""
        record = json.loads((self.tmp / "run" / "attachment.json").read_text())
        return {str(hook["prog_id"]) for hook in record["hooks"]}

    def stop(self) -> dict[str, str]:
        """Ctrl-C; returns each stage's exit status as honcho reports it."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(15)
        self.log.close()
        return dict(re.findall(r"(\w+)\.1 stopped \((rc=-?\d+)\)", self.output()))

    def output(self) -> str:
        return (self.tmp / "honcho.log").read_text()

    def counters(self, stage: str) -> dict:
        """A stage's last counters; {} while it has none (not started, or restarting: a
        stage removes its old file at start)."""
        try:
            return json.loads((self.tmp / "run" / f"{stage}.counters.json").read_text())["counters"]
        except (OSError, ValueError):
            return {}

    def reloaded(self, counter: str, count: int = 1) -> bool:
        """Every stage that follows the policy counted `counter` count times."""
        return all(self.counters(stage).get(counter, 0) >= count
                   for stage in ("policy", "dns", "enrich"))

    def jsonl(self) -> list[dict]:
        path = self.tmp / "audit.jsonl"
        # Lines end at "\n" only: a record may hold U+0085, which Go's encoder (and so
        # sluice's) writes unescaped and str.splitlines() would take for a line end.
        data = path.read_bytes() if path.exists() else b""
        # persist may be mid-write: what follows the last "\n" is not yet a line (it may
        # even end inside a UTF-8 character).
        text = data[:data.rfind(b"\n") + 1].decode()
        return [json.loads(line) for line in text.split("\n") if line]

    def rows(self) -> list[dict]:
        db = sqlite3.connect(f"file:{self.tmp}/audit.db?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM audit_events ORDER BY id")]
        finally:
            db.close()


def attached_cgroup_prog_ids() -> set[str]:
    out = sh("bpftool", "cgroup", "tree", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()}


def find(records, **fields):
    return [r for r in records if all(r.get(k) == v for k, v in fields.items())]
