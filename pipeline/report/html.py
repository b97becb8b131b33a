"""The report as one self-contained HTML page: inline style, an inline SVG timeline of
allowed and blocked connections, no script and nothing fetched, so it opens anywhere
(an artifact downloaded from CI, a mail attachment) without a network."""

from __future__ import annotations

import html
import math
from collections.abc import Set

from .data import Minute
from .render import REFUSED_NOT_DRAFTED, Report, when

MAX_BARS = 240              # more minutes than this are drawn in wider buckets
CHART_W, CHART_H, PAD = 960, 220, 40
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#1b1f24}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;width:100%}th,td{padding:.3em .6em;border-bottom:1px solid #eaeef2;
text-align:left;vertical-align:top}td.n{text-align:right}code{font-size:.95em}
.bad{color:#b42318;font-weight:600}.good{color:#1a7f37;font-weight:600}
pre{background:#f6f8fa;padding:1em;overflow:auto}.add{color:#1a7f37}.del{color:#b42318}
svg text{font-size:11px;fill:#57606a}.allowed{fill:#2da44e}.blocked{fill:#cf222e}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(header: list[str], rows: list[list[str]],
           numeric: Set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def buckets(timeline: list[Minute], most: int = MAX_BARS) -> list[tuple[str, int, int]]:
    """(label, allowed, blocked) per bar: a minute each, or several when there are many."""
    width = max(1, math.ceil(len(timeline) / most))
    bars = []
    for start in range(0, len(timeline), width):
        chunk = timeline[start:start + width]
        bars.append((chunk[0].minute, sum(m.allowed for m in chunk),
                     sum(m.blocked for m in chunk)))
    return bars


def chart(timeline: list[Minute]) -> str:
    bars = buckets(timeline)
    if not bars:
        return "<p>No connections in this window.</p>"
    top = max(allowed + blocked for _, allowed, blocked in bars) or 1
    plot_w, plot_h = CHART_W - 2 * PAD, CHART_H - 2 * PAD
    step = plot_w / len(bars)
    parts = [f'<svg role="img" width="{CHART_W}" '
             f'height="{CHART_H}" viewBox="0 0 {CHART_W} {CHART_H}">',
             "<title>Allowed and blocked connections per minute</title>",
             f'<line x1="{PAD}" y1="{CHART_H - PAD}" x2="{CHART_W - PAD}" '
             f'y2="{CHART_H - PAD}" stroke="#8c959f"/>',
             f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">{top}</text>',
             f'<text x="{PAD - 4}" y="{CHART_H - PAD}" text-anchor="end">0</text>']
    for index, (label, allowed, blocked) in enumerate(bars):
        x = PAD + index * step
        w = max(step * 0.8, 1)
        y: float = CHART_H - PAD
        for kind, value in (("allowed", allowed), ("blocked", blocked)):
            if not value:
                continue
            h = value / top * plot_h
            y -= h
            parts.append(f'<rect class="{kind}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
                         f'height="{h:.1f}"><title>{_e(label)}: {value} {kind}</title></rect>')
    parts.append(f'<text x="{PAD}" y="{CHART_H - PAD + 16}">{_e(bars[0][0])}</text>')
    parts.append(f'<text x="{CHART_W - PAD}" y="{CHART_H - PAD + 16}" text-anchor="end">'
                 f'{_e(bars[-1][0])}</text>')
    parts.append(f'<rect class="allowed" x="{PAD}" y="8" width="10" height="10"/>'
                 f'<text x="{PAD + 14}" y="17">allowed</text>'
                 f'<rect class="blocked" x="{PAD + 80}" y="8" width="10" height="10"/>'
                 f'<text x="{PAD + 94}" y="17">blocked</text>')
    parts.append("</svg>")
    return "".join(parts)


def _diff(text: str) -> str:
    lines = []
    for line in text.rstrip("\n").splitlines():
        kind = "add" if line.startswith("+") and not line.startswith("+++") else \
            "del" if line.startswith("-") and not line.startswith("---") else ""
        lines.append(f'<span class="{kind}">{_e(line)}</span>' if kind else _e(line))
    return "<pre>" + "\n".join(lines) + "</pre>"


def as_html(report: Report) -> str:
    f = report.facts
    window = (f"from {when(report.since)} to {when(report.until)}" if report.since
              else f"all records up to {when(report.until)}")
    title = f"sluice egress report: {report.host}"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
           f"<h1>{_e(title)}</h1>",
           f'<p class="summary">{_e(report.mode)} mode, {_e(window)}: '
           f"<strong>{_e(report.headline())}</strong>.</p>",
           "<h2>Timeline</h2>", chart(f.timeline)]
    out.append(f'<h2 id="blocked">Destinations {_e(report.blocked_word)}</h2>')
    out.append(_table(["destination", "protocol", "processes", "attempts", "first seen",
                       "last seen"],
                      [[f"<code>{_e(b.key)}</code>", _e(b.protocol),
                        _e(", ".join(b.processes) or "?"), str(b.attempts),
                        _e(when(b.first_seen)), _e(when(b.last_seen))] for b in f.blocked], {3})
               if f.blocked else "<p>None.</p>")
    out.append('<h2 id="late-allowed">Late-allowed</h2>')
    out.append(_table(["destination", "address", "protocol", "rule", "count", "processes"],
                      [[f"<code>{_e(la.key)}</code>", _e(la.dst_ip), _e(la.protocol),
                        f"<code>{_e(la.matched_rule)}</code>", str(la.count),
                        _e(", ".join(la.processes) or "?")] for la in f.late_allowed], {4})
               if f.late_allowed else "<p>None.</p>")
    out.append('<h2 id="dns-refused">Refused DNS names</h2>')
    out.append(_table(["name", "attempts", "first seen", "last seen"],
                      [[f"<code>{_e(r.name)}</code>", str(r.attempts), _e(when(r.first_seen)),
                        _e(when(r.last_seen))] for r in f.refused], {1})
               if f.refused else "<p>None.</p>")
    out.append('<h2 id="posture">Posture</h2>')
    out.append(_posture(report.posture))
    out.append('<h2 id="suggestion">Suggested allowlist additions</h2>')
    if report.suggestion.diff:
        out.append("<p>Allows what was blocked above. Review it first: a blocked destination "
                   "may be exactly what the firewall is for.</p>")
        out.append(_diff(report.suggestion.diff))
    else:
        out.append("<p>None: nothing was blocked that a rule could allow.</p>")
    notes = [f"not drafted: {line}" for line in report.suggestion.not_drafted]
    if f.refused:
        notes.append(REFUSED_NOT_DRAFTED[2:])
    if notes:
        out.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _posture(posture: dict | None) -> str:
    if posture is None:
        return "<p>No posture: no pipeline was running when this report was made.</p>"
    problems = posture.get("problems", [])
    verdict = ('<p class="good">Protection was fully on.</p>' if not problems else
               '<p class="bad">Protection was NOT fully on: ' + _e("; ".join(problems)) + "</p>")
    rows = [[_e(name), _e(layer["state"]), _e(layer["detail"])]
            for name, layer in posture.get("layers", {}).items()]
    return verdict + _table(["layer", "state", "detail"], rows)
