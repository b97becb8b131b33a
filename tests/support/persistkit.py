"""What the persist tests share: the stage's settings with its database still to be created,
frames pushed to its inbox, and its JSONL lines read back as records."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import zmq

from pipeline.audit.records import AuditEvent, parse_timestamp
from pipeline.settings import Settings
from pipeline.topology import inbox_address
from tests.support.stagekit import stage_settings


def make_settings(tmp_path: Path, **env: str) -> Settings:
    # The database one directory down: persist creates it.
    return stage_settings(tmp_path, **{"SLUICE_DB": f"sqlite:///{tmp_path / 'db' / 'audit.db'}",
                                       **env})


class Pusher:
    """pusher(settings, *frames): each frame to persist's inbox under settings.run_dir, on one
    PUSH socket connected at the first call (lingering, so a stop sees every frame sent)."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self.sockets: list[zmq.Socket] = []

    def __call__(self, settings: Settings, *frames: bytes) -> None:
        if not self.sockets:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 5000)
            sock.connect(inbox_address(settings.run_dir, "persist"))
            self.sockets.append(sock)
        for frame in frames:
            self.sockets[0].send(frame)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def jsonl_fields(path: Path) -> list[dict]:
    """Each line as a dict of every AuditEvent field, defaults filled in."""
    if not path.exists():
        return []
    defaults = msgspec.structs.asdict(AuditEvent(0, ""))
    del defaults["seq"]  # the journal number is not part of the stored record
    text = path.read_text()
    out = []
    for line in text[:text.rfind("\n") + 1].splitlines():  # a line being written is not yet one
        data = {**defaults, **json.loads(line)}
        data["timestamp"] = parse_timestamp(data["timestamp"])
        out.append(data)
    return out
