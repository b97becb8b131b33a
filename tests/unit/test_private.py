"""Private by default: the audit trail sluice creates is for root (and SLUICE_GROUP) alone.

Breakage 6: when sluice created the store's directory it made it 0755 and the database and
JSONL files 0644, so every local user could read every process name and destination.
"""

import grp
import logging
import os
import stat

import pytest
from typer.testing import CliRunner

from pipeline import messages
from pipeline.audit.records import AuditEvent
from pipeline.cli.app import app
from pipeline.errors import SettingsError
from pipeline.events import RawEvent
from pipeline.kernel.doctor import check_private
from pipeline.loop import Counters
from pipeline.recording import open_recorder
from pipeline.stages.persist import PersistStage
from tests.support.stagekit import StageThread, stage_settings
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000
GROUP = "daemon"  # gid 1 on every Debian


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def run_persist(tmp_path, peer, **env):
    """Run persist on a store and log in new directories; every path's (mode, gid) while it
    runs (SQLite removes the -wal and -shm files at a clean close)."""
    settings = stage_settings(tmp_path, SLUICE_DB=f"sqlite:///{tmp_path}/new/db/audit.db",
                              SLUICE_AUDIT_LOG=str(tmp_path / "new" / "log" / "audit.jsonl"),
                              **env)
    new = tmp_path / "new"
    stage = StageThread(PersistStage(), settings).start()
    peer.pusher("persist").send(messages.encode(
        [AuditEvent(T0, "connection_blocked", dst_ip="10.0.0.1", event_id="e1")]))
    wait_for(lambda: stage.counters().get("records_stored"), "the record stored")
    seen = {str(p.relative_to(tmp_path)): (mode(p), p.stat().st_gid)
            for p in [new, *new.rglob("*"), settings.run_dir,
                      settings.run_dir / "persist.counters.json"]}
    assert stage.finish() == 0
    return seen


def test_persist_creates_its_store_and_log_private_under_a_loose_umask(tmp_path, loose_umask,
                                                                        peer):
    assert {path: m for path, (m, _) in run_persist(tmp_path, peer).items()} == {
        "new": 0o700, "new/db": 0o700, "new/log": 0o700, "new/db/audit.db": 0o600,
        "new/db/audit.db-wal": 0o600, "new/db/audit.db-shm": 0o600,
        "new/log/audit.jsonl": 0o600, "run": 0o700, "run/persist.counters.json": 0o600}


def test_with_a_group_readers_get_0640_files_in_0750_directories(tmp_path, loose_umask, peer):
    gid = grp.getgrnam(GROUP).gr_gid
    seen = run_persist(tmp_path, peer, SLUICE_GROUP=GROUP)
    files = ["new/db/audit.db", "new/db/audit.db-wal", "new/db/audit.db-shm",
             "new/log/audit.jsonl"]
    assert [seen[f] for f in files] == [(0o640, gid)] * 4
    assert [seen[d] for d in ("new", "new/db", "new/log")] == [(0o750, gid)] * 3
    assert seen["run"][0] == 0o700  # sockets and markers stay root's


def test_a_recording_is_private_and_group_readable_when_asked(tmp_path, loose_umask):
    for group, expected in (("", (0o600, 0o700)), (GROUP, (0o640, 0o750))):
        path = tmp_path / group / "rec" / "sluice.rec"
        settings = stage_settings(tmp_path, SLUICE_RECORD=str(path), SLUICE_GROUP=group)
        recorder = open_recorder(settings, Counters(), logging.getLogger("t"))
        recorder.add("raw_events", [RawEvent(4, False, 6, 0, "10.0.0.2", "10.0.0.1", 1, 2, T0,
                                             7, "c", 1, "", 0, "")])
        recorder.close()
        assert (mode(path), mode(path.parent)) == expected


def test_an_unknown_group_stops_at_start_naming_the_setting(tmp_path):
    with pytest.raises(SettingsError, match="SLUICE_GROUP='no-such-group-x': no group named"):
        stage_settings(tmp_path, SLUICE_GROUP="no-such-group-x")


def test_doctor_names_each_existing_path_that_is_looser(tmp_path):
    settings = stage_settings(tmp_path, SLUICE_DB=f"sqlite:///{tmp_path}/data/audit.db",
                              SLUICE_AUDIT_LOG=str(tmp_path / "data" / "audit.jsonl"))
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    settings.run_dir.mkdir(mode=0o700)
    for name in ("audit.db", "audit.jsonl"):
        (data / name).touch(mode=0o600)
        os.chmod(data / name, 0o600)
    assert check_private(settings).ok
    os.chmod(data / "audit.db", 0o644)
    os.chmod(data, 0o755)
    check = check_private(settings)
    assert not check.ok
    assert check.line().startswith("loose    private files: ")
    assert f"{data}/audit.db is mode 0644, more open than 0600" in check.detail
    assert f"{data} is mode 0755, more open than 0700" in check.detail
    assert "audit.jsonl" not in check.detail
    # With SLUICE_GROUP, 0640 of that group is right; of another group it is not.
    os.chmod(data / "audit.db", 0o640)
    os.chmod(data, 0o750)
    grouped = stage_settings(tmp_path, SLUICE_DB=f"sqlite:///{data}/audit.db",
                             SLUICE_AUDIT_LOG=str(data / "audit.jsonl"), SLUICE_GROUP=GROUP)
    assert "more open than 0700" in check_private(grouped).detail  # still root's group
    for path in (data, data / "audit.db"):
        os.chown(path, -1, grp.getgrnam(GROUP).gr_gid)
    assert check_private(grouped).ok


def test_the_doctor_command_reports_loose_paths(tmp_path, monkeypatch):
    log = tmp_path / "audit.jsonl"
    log.touch()
    os.chmod(log, 0o644)
    monkeypatch.setenv("SLUICE_AUDIT_LOG", str(log))
    monkeypatch.setenv("SLUICE_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("SLUICE_DB", f"sqlite:///{tmp_path}/audit.db")
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 1
    assert f"loose    private files: {log} is mode 0644, more open than 0600" in result.output
