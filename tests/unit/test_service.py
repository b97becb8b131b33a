"""The service's pure parts: the Procfile up writes, the systemd units, the service record
and the settings `down` stops with. (Starting and stopping for real: test_service_e2e.py.)"""

import configparser
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.service import Record, procfile_text, process_start, recorded_settings
from pipeline.topology import STAGES

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_the_procfile_up_writes_is_the_repositorys_with_this_installs_sluice():
    ours = procfile_text("/opt/sluice/.venv/bin/sluice")
    theirs = (ROOT / "Procfile").read_text()
    assert sorted(ours.splitlines()) == sorted(
        theirs.replace("exec sluice ", "exec /opt/sluice/.venv/bin/sluice ").splitlines())
    assert "exec '/a dir/sluice' run capture" in procfile_text("/a dir/sluice")


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(path)
    return unit


def test_systemd_units_name_the_commands_and_the_environment_file(tmp_path):
    result = runner.invoke(app, ["systemd-units", str(tmp_path), "--env-file",
                                 "/etc/sluice/prod.env"])
    assert result.exit_code == 0, result.output
    sluice = str(Path(sys.executable).parent / "sluice")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["sluice.target", *(f"sluice-{s}.service" for s in STAGES)])
    target = read_unit(tmp_path / "sluice.target")
    assert set(target["Unit"]["Wants"].split()) == {f"sluice-{s}.service" for s in STAGES}
    assert target["Install"]["WantedBy"] == "multi-user.target"
    for stage in STAGES:
        unit = read_unit(tmp_path / f"sluice-{stage}.service")
        service = unit["Service"]
        assert service["ExecStart"] == f"{sluice} run {stage}"
        assert service["EnvironmentFile"] == "/etc/sluice/prod.env"
        assert service["User"] == "root" and service["Restart"] == "on-failure"
        assert unit["Unit"]["PartOf"] == "sluice.target"
        assert unit["Install"]["WantedBy"] == "sluice.target"
        # No order between the stages: a stop signals them all at once and their feed ends
        # order it (pipeline/stopping.py); systemd would stop an After= stage first, before
        # its upstream, which would then have no one to hand its last records to.
        ordering = " ".join(unit["Unit"].get(key, "") for key in ("After", "Before"))
        assert "sluice-" not in ordering, ordering
    # The command the unit names really is sluice, and really has that stage.
    check = subprocess.run([sluice, "run", "--help"], capture_output=True, text=True)
    assert check.returncode == 0 and "capture" in check.stdout


def test_the_record_round_trips_and_knows_a_reused_pid(tmp_path):
    me = os.getpid()
    record = Record(me, process_start(me), 1, "log", "pid", "enforce", {"SLUICE_MODE": "enforce"},
                    {"capture": 5})
    record.save(tmp_path)
    assert Record.load(tmp_path) == record and record.running()
    assert not Record(me, "12", 1, "", "", "audit", {}, {}).running(), "another start time"
    (tmp_path / "sluice.json").write_text("{not json")
    assert Record.load(tmp_path) is None


def test_a_zombie_counts_as_gone():
    child = subprocess.Popen(["true"])
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        pass
    assert process_start(child.pid) == ""
    child.wait()


def test_down_stops_with_the_recorded_settings_and_todays_gate(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Record(1, "", 1, "", "", "enforce", {"SLUICE_RUN_DIR": str(run_dir), "SLUICE_MODE": "enforce",
                                         "SLUICE_DB": "sqlite:///recorded.db"}, {}).save(run_dir)
    settings, record = recorded_settings({"SLUICE_RUN_DIR": str(run_dir),
                                          "SLUICE_DB": "sqlite:///other.db",
                                          "SLUICE_FAIL_ON_BLOCK": "true"})
    assert record is not None
    assert (settings.mode, settings.db, settings.fail_on_block) == (
        "enforce", "sqlite:///recorded.db", True)
    assert recorded_settings({"SLUICE_RUN_DIR": str(tmp_path)})[1] is None


def test_wait_gives_up_at_the_deadline_naming_what_it_waited_for(tmp_path):
    from pipeline.service import TimedOut, wait_until_ready
    from pipeline.settings import Settings

    settings = Settings.from_env({"SLUICE_RUN_DIR": str(tmp_path)})
    now = [0.0]
    try:
        wait_until_ready(settings, ["enrich", "dns"], 5, clock=lambda: now[0],
                         sleep=lambda s: now.__setitem__(0, now[0] + s))
    except TimedOut as err:
        assert str(err) == ("timed out after 5s waiting for: stages enrich, dns; layer "
                            "dns_proxy is down: stage dns is not running")
        assert err.exit_code == 4
    else:
        raise AssertionError("no timeout")


def test_wait_stops_at_once_when_the_pipeline_is_gone(tmp_path):
    from pipeline.service import NotReady, wait_until_ready
    from pipeline.settings import Settings

    settings = Settings.from_env({"SLUICE_RUN_DIR": str(tmp_path)})
    try:
        wait_until_ready(settings, list(STAGES), 60, exited=lambda: "honcho exited with status 1")
    except NotReady as err:
        assert str(err) == "honcho exited with status 1" and err.exit_code == 3
    else:
        raise AssertionError("kept waiting")


def test_up_refuses_a_run_dir_whose_stages_run_without_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "persist.ready").write_text(f"pid={os.getpid()}\n")
    result = runner.invoke(app, ["up", "--timeout", "1"], env={"SLUICE_RUN_DIR": str(run_dir)})
    assert result.exit_code == 1
    assert result.output == (f"sluice: stages started otherwise (honcho start?) are running in "
                             f"{run_dir} (persist pid {os.getpid()}); stop them first\n")
    assert not (run_dir / "sluice.json").exists()
