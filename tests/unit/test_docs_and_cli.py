"""The README, the Procfile and the CLI agree with the code they describe."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import __version__
from pipeline.cli.app import app
from pipeline.settings import SETTINGS, Settings
from pipeline.errors import SettingsError
from pipeline.topology import STAGES

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
runner = CliRunner()


def test_readme_opens_with_exactly_the_two_commands():
    block = re.search(r"```sh\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert [line.split("#")[0].strip() for line in block] == [
        "sudo ./bootstrap run", "sudo ./bootstrap test"]


def test_ci_runs_the_readme_test_command():
    assert "./bootstrap test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.variable)
def test_every_setting_is_in_the_readme(setting):
    assert f"`{setting.variable}`" in README


def test_procfile_runs_every_stage_of_the_topology_once():
    lines = [line for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()]
    labels = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines}
    assert set(labels) == set(STAGES)
    # exec: honcho runs each line under sh; the stage itself must get the signal and report
    # its own exit code.
    assert all(cmd == f"exec sluice run {label}" for label, cmd in labels.items())


def test_readme_stage_table_matches_the_topology():
    rows = re.findall(r"^\| (\w+) \| ([\w.\-, ]+|\(none\)) \| ([\w, ]+|\(none\)) \|", README, re.M)
    table = {stage: (binds, feeds) for stage, binds, feeds in rows if stage in STAGES}
    assert set(table) == set(STAGES)
    for stage, wiring in STAGES.items():
        binds = ", ".join(f"{i.name}.sock" for i in wiring.inboxes) or "(none)"
        feeds = ", ".join(wiring.feed_names) or "(none)"
        assert table[stage] == (binds, feeds), stage


@pytest.mark.parametrize("command",
                         [c.name or c.callback.__name__ for c in app.registered_commands])
def test_every_command_has_help_and_is_in_the_readme(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert f"`sluice {command}" in README


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sluice {__version__}"


def test_unknown_stage_is_one_line_and_exit_2():
    result = runner.invoke(app, ["run", "nonsense"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "sluice: unknown stage 'nonsense'; stages are " + ", ".join(STAGES)]


@pytest.mark.parametrize("variable, value", [
    ("SLUICE_MODE", "sometimes"), ("SLUICE_BATCH_MAX", "0"), ("SLUICE_LOG_LEVEL", "loud"),
    ("SLUICE_FLUSH_INTERVAL", "soon"), ("SLUICE_RUN_DIR", ""),
])
def test_a_bad_setting_names_the_variable(variable, value):
    with pytest.raises(SettingsError, match=f"^{variable}="):
        Settings.from_env({variable: value})


def test_wait_ready_reports_a_failed_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_RUN_DIR", str(tmp_path))
    (tmp_path / "policy.failed").write_text("policy.json:3:1: Expecting value\n")
    result = runner.invoke(app, ["wait-ready", "--timeout", "1"])
    assert result.exit_code == 3
    assert "stage policy failed: policy.json:3:1: Expecting value" in result.output


def test_wait_ready_times_out_naming_missing_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_RUN_DIR", str(tmp_path))
    result = runner.invoke(app, ["wait-ready", "--timeout", "0.2", "--stages", "enrich"])
    assert result.exit_code == 4 and "enrich" in result.output


POLICY = ('{"defaultAction": "deny", "rules": [{"type": "hostname", "value": "*.github.com", '
          '"action": "allow", "ports": [{"port": 443, "protocol": "tcp"}]}]}')


def test_policy_check_prints_the_rules_and_exits_0(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(POLICY)
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 0 and "*.github.com" in result.output


def test_policy_check_lists_every_problem_and_exits_1(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text('{"rules": [{"type": "cidr", "value": "10.0.0.0/8", "action": "allow", '
                    '"ports": [{"port": 70000, "protocol": "TCP"}]}]}')
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert "rules[0].ports[0].protocol" in result.output and "70000" in result.output


def test_policy_explain_json_has_exactly_the_documented_keys(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(POLICY)
    result = runner.invoke(app, ["policy", "explain", "api.github.com", "--port", "443",
                                 "--protocol", "tcp", "--policy", str(path), "--json"])
    assert result.exit_code == 0
    data = __import__("json").loads(result.output)
    assert set(data) == {"target", "allow_rule", "allow_ports", "deny_rule", "deny_ports",
                         "decision", "reason"}
    assert (data["allow_rule"], data["allow_ports"], data["decision"]) == (
        "*.github.com", [{"port": 443, "protocol": "tcp"}], "allow")
    denied = runner.invoke(app, ["policy", "explain", "api.github.com", "--port", "80",
                                 "--policy", str(path), "--json"])
    assert __import__("json").loads(denied.output)["decision"] == "deny"


@pytest.mark.parametrize("sub", ["check", "explain"])
def test_policy_subcommands_have_help_and_are_in_the_readme(sub):
    assert runner.invoke(app, ["policy", sub, "--help"]).exit_code == 0
    assert f"`sluice policy {sub}" in README


def test_the_bundled_example_policy_is_valid():
    from pipeline.settings import BUNDLED_POLICY

    result = runner.invoke(app, ["policy", "check", str(BUNDLED_POLICY)])
    assert result.exit_code == 0 and "github.com" in result.output


# ------------------------------------------------------------------ the CLI's conventions

def _commands():
    """(name as typed, click command) of every command, policy's subcommands included."""
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            for sub, subcommand in command.commands.items():
                yield f"{name} {sub}", subcommand
        else:
            yield name, command


COMMANDS = dict(_commands())
# Options named after a setting that deliberately do not read its variable, and why.
WITHOUT_ENVVAR = {
    ("replay", "policy"): "a what-if run names its policy explicitly",
    ("replay", "db"): "a what-if run keeps its rows apart from the live store",
    ("replay", "mode"): "the default is the recording's mode",
    ("report", "db"): "after `sluice up`, the settings it recorded decide",
    ("report", "host"): "after `sluice up`, the settings it recorded decide",
    ("suggest", "host"): "a filter over stored rows, not this machine's name",
    ("policy explain", "policy"): "the default is the whole SLUICE_* policy (file or form)",
}
SETTING_OF_OPTION = {s.name: s.variable for s in SETTINGS} | {
    "expected": "SLUICE_EXPECTED_BLOCKS"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_has_an_example(name):
    result = runner.invoke(app, [*name.split(), "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert re.search(rf"Example: .*sluice {name}\b", result.output), result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_options_named_after_a_setting_read_its_variable(name):
    for param in COMMANDS[name].params:
        variable = SETTING_OF_OPTION.get(param.name)
        if variable is None or (name, param.name) in WITHOUT_ENVVAR:
            continue
        assert param.envvar == variable, f"sluice {name} --{param.name}"


def test_an_option_reads_its_variable_when_not_given(tmp_path):
    expected = tmp_path / "expected.txt"
    expected.write_text("no-port-here\n")
    result = runner.invoke(app, ["report"], env={"SLUICE_RUN_DIR": str(tmp_path),
                                                 "SLUICE_EXPECTED_BLOCKS": str(expected)})
    assert result.exit_code == 2 and "expected.txt" in result.output


def test_every_error_exit_code_is_one_of_the_table():
    import importlib
    import pkgutil

    import pipeline
    from pipeline.errors import ExitCode, SluiceError

    for module in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if module.name != "pipeline.kernel.compile":  # imports bcc: the kernel tests load it
            importlib.import_module(module.name)
    pending, seen = [SluiceError], []
    while pending:
        cls = pending.pop()
        seen.append(cls)
        pending.extend(cls.__subclasses__())
    assert len(seen) > 10
    for cls in seen:
        assert isinstance(cls.exit_code, ExitCode), cls
    # and nothing spells a code as a bare number
    for path in (ROOT / "pipeline").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"exit_code = \d|Exit\(\d", text), path


def test_command_modules_do_not_import_each_other():
    import ast

    for module in ("data", "service", "shared"):
        tree = ast.parse((ROOT / "pipeline" / "cli" / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 1}
        assert not imported & {"app", "data", "service"}, module
