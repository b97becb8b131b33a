"""`sluice report`: the facts of a known store (SQLite and PostgreSQL), the three formats
(the HTML parsed, not compared as text), the suggested diff, and `--since` on a long-running
store."""

from __future__ import annotations

import html.parser
import json
import subprocess
import time

import pytest
from typer.testing import CliRunner

from pipeline.audit.records import AuditEvent, sql_timestamp
from pipeline.cli.app import app
from pipeline.report.data import Blocked, read_facts
from pipeline.report.html import as_html, buckets
from pipeline.report.make import make_report
from pipeline.report.render import as_json, as_markdown
from pipeline.report.suggestion import environment_diff, file_diff, suggest
from pipeline.settings import Settings
from pipeline.audit.store import AuditStore

runner = CliRunner()
S = 1_000_000_000
DAY = 86_400 * S
NOW = time.time_ns() // (60 * S) * 60 * S          # a whole minute: stable timeline keys
T = NOW - 3600 * S                                  # the run: the last hour


def at(seconds: int) -> str:
    return sql_timestamp(T + seconds * S)


def row(n, seconds, event_type, dst_ip="", port=0, protocol="", name="", process="", rule="",
        host="runner-1", base=None):
    return AuditEvent((T if base is None else base) + seconds * S, event_type,
                      src_ip="10.0.0.2" if dst_ip else "", dst_ip=dst_ip, dst_hostname=name,
                      dst_port=port, protocol=protocol, process=process, pid=100 + n,
                      matched_rule=rule, blocked=event_type != "connection_allowed",
                      event_id=f"report-{n}", host=host)


EVIL = dict(dst_ip="203.0.113.9", port=443, protocol="TCP", name="evil.example")
RUN = [
    row(1, 10, "connection_blocked", process="curl", **EVIL),
    row(2, 70, "connection_blocked", process="python3", **EVIL),
    row(3, 75, "connection_blocked", process="curl", **EVIL),
    row(4, 20, "connection_blocked", "198.51.100.7", 8080, "TCP", process="node"),
    row(5, 30, "connection_blocked", "2001:db8::5", 443, "TCP", process="node"),
    row(6, 40, "protocol_blocked", "198.51.100.8", 0, "GRE", process="tunnel"),
    # Blocked, then opened when the name was resolved: superseded, not a block.
    row(7, 50, "connection_blocked", "192.0.2.10", 443, "TCP", "cdn.allowed.example", "git"),
    row(8, 51, "connection_late_allowed", "192.0.2.10", 443, "TCP", "cdn.allowed.example",
        "git", rule="allowed.example"),
    row(9, 60, "connection_allowed", "192.0.2.11", 443, "TCP", "api.allowed.example", "git"),
    row(10, 61, "connection_allowed", "192.0.2.11", 443, "TCP", "api.allowed.example", "git"),
    row(11, 80, "dns_blocked", name="exfil.example"),
    row(12, 140, "dns_blocked", name="exfil.example"),
    # Another host of the fleet: never in runner-1's report.
    row(13, 10, "connection_blocked", "203.0.113.99", 22, "TCP", process="ssh", host="runner-2"),
]
# The same host three days before: in an all-time report, not in one of the last 24 hours.
OLD = [row(100, 0, "connection_blocked", process="curl", base=NOW - 3 * DAY, **EVIL),
       row(101, 5, "dns_blocked", name="old.example", base=NOW - 3 * DAY)]


@pytest.fixture
def store(db_url):
    audit = AuditStore(db_url)
    audit.migrate()
    assert audit.write(RUN + OLD) == len(RUN + OLD)
    audit.close()
    return db_url


def settings_for(tmp_path, db, **env):
    policy = tmp_path / "policy.json"
    if not policy.exists():
        policy.write_text(json.dumps({"defaultAction": "deny", "rules": [
            {"type": "hostname", "value": "allowed.example", "action": "allow",
             "ports": [{"port": 443, "protocol": "tcp"}]}]}, indent=2) + "\n")
    return Settings.from_env({"SLUICE_DB": db, "SLUICE_HOST": "runner-1",
                              "SLUICE_RUN_DIR": str(tmp_path / "run"),
                              "SLUICE_POLICY": str(policy), **env})


# ------------------------------------------------------------------ facts


def test_the_run_window_holds_exactly_the_runs_blocks_and_refusals(store):
    facts = read_facts(store, "runner-1", T)
    assert [(b.key, b.protocol, b.attempts, b.processes, b.first_seen, b.last_seen)
            for b in facts.blocked] == [
        ("evil.example:443", "TCP", 3, ("curl", "python3"), at(10), at(75)),
        ("198.51.100.7:8080", "TCP", 1, ("node",), at(20), at(20)),
        ("198.51.100.8:0", "GRE", 1, ("tunnel",), at(40), at(40)),
        ("[2001:db8::5]:443", "TCP", 1, ("node",), at(30), at(30)),
    ]
    [late] = facts.late_allowed
    assert (late.key, late.dst_ip, late.matched_rule, late.count, late.processes) == (
        "cdn.allowed.example:443", "192.0.2.10", "allowed.example", 1, ("git",))
    assert [(r.name, r.attempts, r.first_seen, r.last_seen) for r in facts.refused] == [
        ("exfil.example", 2, at(80), at(140))]
    minutes = {m.minute: (m.allowed, m.blocked, m.late_allowed, m.dns_blocked)
               for m in facts.timeline}
    # (allowed, blocked, late-allowed, dns refused); a late-allow counts as allowed, the
    # block it superseded not at all.
    assert minutes[at(0)[:16] + "Z"] == (1, 4, 1, 0)
    assert minutes[at(60)[:16] + "Z"] == (2, 2, 0, 1)
    assert minutes[at(120)[:16] + "Z"] == (0, 0, 0, 1)


def test_all_time_reads_the_summary_views_and_agrees_with_a_window_over_everything(store):
    everything = read_facts(store, "runner-1", None)
    window = read_facts(store, "runner-1", 0)
    assert everything == window
    [evil] = [b for b in everything.blocked if b.destination == "evil.example"]
    assert evil.attempts == 4 and evil.first_seen == sql_timestamp(NOW - 3 * DAY)
    assert {r.name for r in everything.refused} == {"exfil.example", "old.example"}


def test_rows_the_rollups_do_not_count_yet_are_in_every_report(db_url):
    """persist's way on SQLite: each batch left out of the rollups but a late-allow's."""
    audit = AuditStore(db_url, defer_rollups=True)
    audit.migrate()
    for record in RUN + OLD:
        audit.write([record])
    lagged = audit.rollup_lag()
    reports = [read_facts(db_url, "runner-1", since) for since in (None, T, 0)]
    audit.catch_up(len(RUN + OLD))
    assert audit.rollup_lag() == 0
    audit.close()
    assert lagged > 0 or not db_url.startswith("sqlite")
    assert [read_facts(db_url, "runner-1", since) for since in (None, T, 0)] == reports
    assert reports[1] == read_facts(_immediate(db_url), "runner-1", T)


def _immediate(db_url):
    """The same records in a store that adds them to the rollups at once (a new SQLite file
    beside the first; on PostgreSQL the first store is that already)."""
    if not db_url.startswith("sqlite"):
        return db_url
    url = db_url.replace("audit.db", "immediate.db")
    audit = AuditStore(url)
    audit.migrate()
    audit.write(RUN + OLD)
    audit.close()
    return url


def test_a_window_takes_whole_days_from_the_rollups_and_its_first_day_from_rows(db_url):
    day8 = 1_767_830_400 * S  # 2026-01-08T00:00:00Z
    hour = 3600 * S
    x = dict(dst_ip="192.0.2.44", port=443, protocol="TCP")
    audit = AuditStore(db_url)
    audit.migrate()
    audit.write([
        row(1, 0, "connection_blocked", process="curl", base=day8 + 6 * hour, **EVIL),  # before
        row(2, 0, "connection_blocked", process="curl", base=day8 + 13 * hour, **EVIL),
        row(3, 0, "connection_blocked", process="wget", base=day8 + 34 * hour, **EVIL),
        row(4, 0, "connection_blocked", process="curl", base=day8 + 57 * hour, **EVIL),
        # Blocked on the first day, late-allowed two days later: superseded, never counted.
        row(5, 0, "connection_blocked", process="git", base=day8 + 14 * hour, **x),
        row(6, 0, "connection_late_allowed", process="git", rule="x.example",
            base=day8 + 56 * hour, name="x.example", **x),
        row(7, 0, "connection_blocked", process="git", base=day8 + 57 * hour, **x),
        row(8, 0, "dns_blocked", name="exfil.example", base=day8 + 11 * hour),  # before
        row(9, 0, "dns_blocked", name="exfil.example", base=day8 + 15 * hour),
        row(10, 0, "dns_blocked", name="exfil.example", base=day8 + 40 * hour)])
    audit.close()
    facts = read_facts(db_url, "runner-1", day8 + 12 * hour)
    assert [(b.key, b.attempts, b.processes, b.first_seen, b.last_seen) for b in facts.blocked] \
        == [("evil.example:443", 3, ("curl", "wget"), sql_timestamp(day8 + 13 * hour),
             sql_timestamp(day8 + 57 * hour)),
            ("192.0.2.44:443", 1, ("git",), sql_timestamp(day8 + 57 * hour),
             sql_timestamp(day8 + 57 * hour))]
    assert [(la.key, la.count) for la in facts.late_allowed] == [("x.example:443", 1)]
    assert [(r.name, r.attempts, r.first_seen) for r in facts.refused] == [
        ("exfil.example", 2, sql_timestamp(day8 + 15 * hour))]


def test_since_24h_on_a_long_running_store(db_url, tmp_path):
    """A month of history, a day in the window: counts and times are the window's."""
    audit = AuditStore(db_url)
    audit.migrate()
    history = []
    for day in range(30):
        for n in range(40):
            history.append(row(10_000 + day * 100 + n, n * 60, "connection_blocked",
                               process="cron", base=NOW - day * DAY - 2 * 3600 * S, **EVIL))
    audit.write(history)
    audit.close()
    result = runner.invoke(app, ["report", "--since", "24h", "--format", "json", "--db", db_url,
                                 "--host", "runner-1"],
                           env={"SLUICE_RUN_DIR": str(tmp_path / "run")})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    [evil] = data["blocked"]
    assert evil["attempts"] == 40 and evil["first_seen"] == sql_timestamp(NOW - 2 * 3600 * S)
    assert data["since"] is not None and data["summary"]["blocked"] == 1


# ------------------------------------------------------------------ formats


def known_report(tmp_path, store, posture=None):
    settings = settings_for(tmp_path, store)
    return make_report(settings, host="runner-1", mode="enforce", since_ns=T,
                       now_ns=NOW, posture=posture)


POSTURE = {"ready": True, "problems": [], "layers": {
    "classifier": {"state": "on", "requested": True, "stage": "capture",
                   "detail": "eth0 egress, enforce mode, default deny, policy generation 1"},
    "dns_redirect": {"state": "off", "requested": False, "stage": "dns",
                     "detail": "not requested"}}, "stages": {}}


def test_markdown_report(tmp_path, store):
    text = as_markdown(known_report(tmp_path, store, POSTURE))
    assert text.startswith("## sluice egress report: `runner-1`\n")
    assert ("enforce mode, from " in text and "**4 destination(s) blocked, 1 late-allowed, "
            "1 DNS name(s) refused**" in text)
    assert (f"| `evil.example:443` | TCP | curl, python3 | 3 | {at(10)[:10]} {at(10)[11:19]}Z "
            f"| {at(75)[:10]} {at(75)[11:19]}Z |") in text
    assert "| `[2001:db8::5]:443` | TCP | node | 1 |" in text
    assert "| `cdn.allowed.example:443` | 192.0.2.10 | TCP | `allowed.example` | 1 | git |" in text
    assert "| `exfil.example` | 2 |" in text
    assert "**Protection was fully on.**" in text
    assert "| classifier | on | eth0 egress, enforce mode, default deny, policy generation 1 |" \
        in text
    diff = text.split("```diff\n", 1)[1].split("```", 1)[0]
    assert '+      "value": "evil.example",' in diff
    assert "not drafted: 198.51.100.8:0 (GRE)" in text
    assert "runner-2" not in text and "203.0.113.99" not in text


def test_json_report(tmp_path, store):
    data = json.loads(as_json(known_report(tmp_path, store)))
    assert data["summary"] == {"blocked": 4, "late_allowed": 1, "dns_refused": 1}
    assert [b["key"] for b in data["blocked"]] == [
        "evil.example:443", "198.51.100.7:8080", "198.51.100.8:0", "[2001:db8::5]:443"]
    assert data["blocked"][0]["processes"] == ["curl", "python3"]
    assert data["posture"] is None and data["mode"] == "enforce"
    values = {(r["type"], r["value"]) for r in data["suggested_rules"]}
    assert values == {("hostname", "evil.example"), ("cidr", "198.51.100.7/32"),
                      ("cidr", "2001:db8::5/128")}
    assert data["policy_diff"].startswith("--- a/")


class Page(html.parser.HTMLParser):
    """The parts of the HTML report a reader sees: headings, table rows, chart bars."""

    def __init__(self) -> None:
        super().__init__()
        self.tags, self.sections, self.rects, self.links = [], {}, [], []
        self.section, self.row, self.cell, self.text = None, None, None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "h2":
            self.text = []
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "rect":
            self.rects.append(attrs.get("class"))

    def handle_endtag(self, tag):
        if tag == "h2":
            self.section = "".join(self.text).strip()
            self.sections[self.section] = []
        elif tag in ("td", "th") and self.row is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.section:
            self.sections[self.section].append(self.row)
            self.row = None

    def handle_data(self, data):
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)


def test_html_report_is_one_self_contained_page(tmp_path, store):
    page = Page()
    page.feed(as_html(known_report(tmp_path, store, POSTURE)))
    assert {"script", "link", "img", "iframe"}.isdisjoint(page.tags)
    assert page.links == [], "nothing is fetched: the page must open without a network"
    assert "svg" in page.tags and page.tags.count("style") == 1
    blocked = page.sections["Destinations blocked"]
    assert blocked[0] == ["destination", "protocol", "processes", "attempts", "first seen",
                          "last seen"]
    assert [r[0] for r in blocked[1:]] == ["evil.example:443", "198.51.100.7:8080",
                                           "198.51.100.8:0", "[2001:db8::5]:443"]
    assert blocked[1][1:4] == ["TCP", "curl, python3", "3"]
    assert page.sections["Late-allowed"][1][:4] == [
        "cdn.allowed.example:443", "192.0.2.10", "TCP", "allowed.example"]
    assert page.sections["Refused DNS names"][1][:2] == ["exfil.example", "2"]
    assert page.sections["Posture"][1] == [
        "classifier", "on", "eth0 egress, enforce mode, default deny, policy generation 1"]
    # One bar segment per minute and kind with connections, plus the legend's two swatches.
    facts = read_facts(store, "runner-1", T)
    segments = sum((m.allowed > 0) + (m.blocked > 0) for m in facts.timeline)
    assert page.rects.count("allowed") + page.rects.count("blocked") == segments + 2


def test_a_long_timeline_is_drawn_in_wider_bars():
    from pipeline.report.data import Minute

    minutes = [Minute(f"m{i}", 1, i % 2, 0, 0) for i in range(1000)]
    bars = buckets(minutes, most=240)
    assert len(bars) == 200 and sum(b[1] for b in bars) == 1000 and sum(b[2] for b in bars) == 500


# ------------------------------------------------------------------ the suggested change


def test_the_file_diff_applies_to_a_policy_kept_in_two_space_json(tmp_path):
    policy = tmp_path / "policy.json"
    document = {"defaultAction": "deny", "rules": [
        {"type": "hostname", "value": "pypi.org", "action": "allow"}]}
    policy.write_text(json.dumps(document, indent=2) + "\n")
    blocked = [Blocked("files.example", 443, "TCP", 1, "", "", ())]
    suggestion = suggest(blocked, "policy.json", policy.read_text(), {})
    (tmp_path / "change.diff").write_text(suggestion.diff)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "apply", "change.diff"], cwd=tmp_path, check=True)
    applied = json.loads(policy.read_text())
    assert applied["rules"][1] == {"type": "hostname", "value": "files.example",
                                   "action": "allow",
                                   "ports": [{"port": 443, "protocol": "tcp"}]}
    result = runner.invoke(app, ["policy", "check", str(policy)])
    assert result.exit_code == 0, result.output


def test_the_environment_diff_extends_the_variables():
    rules = [{"type": "hostname", "value": "files.example", "action": "allow",
              "ports": [{"port": 443, "protocol": "tcp"}, {"port": 80, "protocol": "tcp"}]},
             {"type": "cidr", "value": "198.51.100.7/32", "action": "allow",
              "ports": [{"port": 8080, "protocol": "tcp"}]},
             {"type": "cidr", "value": "2001:db8::5/128", "action": "allow",
              "ports": [{"port": 443, "protocol": "udp"}]}]
    assert environment_diff({"SLUICE_ALLOWED_HOSTS": "pypi.org:443"}, rules) == (
        "-SLUICE_ALLOWED_HOSTS=pypi.org:443\n"
        "+SLUICE_ALLOWED_HOSTS=pypi.org:443,files.example:80;443\n"
        "+SLUICE_ALLOWED_CIDRS=198.51.100.7:8080,[2001:db8::5]:443\n")


def test_an_unreadable_policy_file_still_gets_a_diff_of_the_rules():
    diff = file_diff("/etc/sluice/policy.json", None, [{"type": "hostname", "value": "x.example",
                                                        "action": "allow"}])
    assert diff.startswith("--- a/etc/sluice/policy.json\n+++ b/etc/sluice/policy.json\n")
    assert '+      "value": "x.example",' in diff


# ------------------------------------------------------------------ the command


def invoke(tmp_path, store, *args, **env):
    return runner.invoke(app, ["report", "--db", store, "--host", "runner-1", *args],
                         env={"SLUICE_RUN_DIR": str(tmp_path / "run"), **env})


def test_report_command_writes_each_format(tmp_path, store):
    for fmt in ("markdown", "json", "html"):
        out = tmp_path / f"report.{fmt}"
        result = invoke(tmp_path, store, "--since", "2h", "--format", fmt, "-o", str(out))
        assert result.exit_code == 0, result.output
        assert "evil.example" in out.read_text()


def test_the_gate_fails_on_unexpected_blocks_with_annotations(tmp_path, store):
    expected = tmp_path / "expected.txt"
    expected.write_text("# known and fine\nevil.example:443\n198.51.100.*:*\n"
                        "[2001:db8::5]:443\n")
    result = invoke(tmp_path, store, "--since", "2h", "-o", str(tmp_path / "r.md"),
                    "--fail-on-block", "--expected", str(expected), GITHUB_ACTIONS="true")
    assert result.exit_code == 8
    assert result.stdout.splitlines() == [
        "::error title=sluice%3A unexpected block of exfil.example::DNS query for exfil.example "
        f"refused 2 time(s), first at {at(80)} (not in the expected-blocks file)"]
    expected.write_text(expected.read_text() + "exfil.example:*\n")
    result = invoke(tmp_path, store, "--since", "2h", "-o", str(tmp_path / "r.md"),
                    "--fail-on-block", "--expected", str(expected), GITHUB_ACTIONS="true")
    assert result.exit_code == 0 and result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--since", "yesterday"], "--since 'yesterday': use an RFC 3339 time or an age"),
    (["--format", "pdf"], "--format 'pdf': use markdown, json, html"),
    (["--expected", "/nonexistent/expected.txt"],
     "expected-blocks file /nonexistent/expected.txt: No such file or directory"),
    (["-o", "/nonexistent/dir/report.md"], "--output /nonexistent/dir/report.md: cannot write"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["report", "--db", f"sqlite:///{tmp_path}/none.db", *args],
                           env={"SLUICE_RUN_DIR": str(tmp_path / "run")})
    assert result.exit_code == 2
    assert result.output.startswith(f"sluice: {message}") and result.output.count("\n") == 1
