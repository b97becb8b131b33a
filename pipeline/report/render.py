"""The report as data, as markdown (the job summary) and as JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Set

from .data import Facts
from .suggestion import Suggestion


@dataclasses.dataclass(frozen=True)
class Report:
    host: str
    mode: str                 # audit or enforce: "blocked" or "would have been blocked"
    since: str | None         # the window's start (stored timestamp form), None = all rows
    until: str
    facts: Facts
    posture: dict | None      # Posture.as_json() while the pipeline ran, None if unknown
    suggestion: Suggestion

    @property
    def blocked_word(self) -> str:
        return "would have been blocked" if self.mode == "audit" else "blocked"

    def headline(self) -> str:
        f = self.facts
        parts = [f"{len(f.blocked)} destination(s) {self.blocked_word}",
                 f"{len(f.late_allowed)} late-allowed", f"{len(f.refused)} DNS name(s) refused"]
        return ", ".join(parts)


def as_json(report: Report) -> str:
    f = report.facts
    return json.dumps({
        "host": report.host, "mode": report.mode, "since": report.since, "until": report.until,
        "summary": {"blocked": len(f.blocked), "late_allowed": len(f.late_allowed),
                    "dns_refused": len(f.refused)},
        "blocked": [{"key": b.key, **dataclasses.asdict(b)} for b in f.blocked],
        "late_allowed": [{"key": la.key, **dataclasses.asdict(la)} for la in f.late_allowed],
        "dns_refused": [dataclasses.asdict(r) for r in f.refused],
        "timeline": [dataclasses.asdict(m) for m in f.timeline],
        "posture": report.posture,
        "suggested_rules": report.suggestion.rules,
        "policy_diff": report.suggestion.diff,
        "not_drafted": report.suggestion.not_drafted,
    }, indent=2) + "\n"


# ------------------------------------------------------------------ markdown


def when(stored: str) -> str:
    """2026-01-01T10:00:01.123456789Z -> 2026-01-01 10:00:01Z"""
    return f"{stored[:10]} {stored[11:19]}Z" if len(stored) >= 19 else stored


def _cell(text: object) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text.replace('`', '')}`"


def _table(header: list[str], rows: list[list[object]],
           right: Set[int] = frozenset()) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def posture_lines(posture: dict | None) -> list[str]:
    if posture is None:
        return ["No posture: no pipeline was running when this report was made."]
    problems = posture.get("problems", [])
    lines = ["**Protection was fully on.**" if not problems else
             "**Protection was NOT fully on:** " + "; ".join(problems), ""]
    rows = [[name, layer["state"], layer["detail"]]
            for name, layer in posture.get("layers", {}).items()]
    return lines + _table(["layer", "state", "detail"], rows)


def as_markdown(report: Report) -> str:
    f = report.facts
    window = (f"from {when(report.since)} to {when(report.until)}" if report.since
              else f"all records up to {when(report.until)}")
    out = [f"## sluice egress report: {_code(report.host)}", "",
           f"{report.mode} mode, {window}: **{report.headline()}**.", ""]

    title = "Would-be-blocked destinations (audit mode: nothing was dropped)" \
        if report.mode == "audit" else "Blocked destinations"
    out += [f"### {title}", ""]
    if f.blocked:
        out += _table(["destination", "protocol", "processes", "attempts", "first seen",
                       "last seen"],
                      [[_code(b.key), b.protocol, ", ".join(b.processes) or "?", b.attempts,
                        when(b.first_seen), when(b.last_seen)] for b in f.blocked], {3})
    else:
        out.append("None.")
    out += ["", "### Late-allowed (blocked at first, opened once their name was resolved)", ""]
    if f.late_allowed:
        out += _table(["destination", "address", "protocol", "rule", "count", "processes"],
                      [[_code(la.key), la.dst_ip, la.protocol, _code(la.matched_rule), la.count,
                        ", ".join(la.processes) or "?"] for la in f.late_allowed], {4})
    else:
        out.append("None.")
    out += ["", "### Refused DNS names", ""]
    if f.refused:
        out += _table(["name", "attempts", "first seen", "last seen"],
                      [[_code(r.name), r.attempts, when(r.first_seen), when(r.last_seen)]
                       for r in f.refused], {1})
    else:
        out.append("None.")
    out += ["", "### Posture", ""] + posture_lines(report.posture)
    out += ["", "### Suggested allowlist additions", ""] + suggestion_lines(report.suggestion)
    if f.refused:
        out.append(REFUSED_NOT_DRAFTED)
    return "\n".join(out) + "\n"


REFUSED_NOT_DRAFTED = ("- refused DNS names are not drafted: no connection followed, so their "
                       "ports are unknown (an audit-mode run shows them)")


def suggestion_lines(suggestion: Suggestion) -> list[str]:
    lines = []
    if suggestion.diff:
        lines += ["Allows what was blocked above. Review it first: a blocked destination "
                  "may be exactly what the firewall is for.", "", "```diff",
                  *suggestion.diff.rstrip("\n").splitlines(), "```"]
    else:
        lines.append("None: nothing was blocked that a rule could allow.")
    lines += [f"- not drafted: {line}" for line in suggestion.not_drafted]
    return lines
