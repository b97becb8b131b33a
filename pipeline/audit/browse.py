"""`sluice browse`: the audit store in Datasette, read-only, on loopback.

Datasette is an optional extra (`pip install -e '.[browse]'`; ./bootstrap installs it). It
opens the SQLite file with mode=ro, so nothing it serves can change the store, and sluice
binds it to 127.0.0.1 only. The metadata it is given describes every view and rollup table
and adds a few canned queries (the README's questions).
"""

from __future__ import annotations

import json
import tempfile
import urllib.parse
from pathlib import Path

from ..errors import ExitCode, SluiceError

LOOPBACK = "127.0.0.1"
DESCRIPTIONS = {
    "audit_events": "One row per audit record (the JSONL line's fields, plus host and event_id).",
    "audit_events_classified": "Every audit record with its destination (hostname, else "
                               "address) and whether a later late-allow superseded it.",
    "audit_events_counted": "The classified records with counted_block: 1 for a block that "
                            "counts (protocol blocks and blocks no late-allow superseded).",
    "blocked_destinations": "Counted blocks per host, destination, port and protocol, with "
                            "first and last time and the processes (all time).",
    "process_activity": "Per host and process: events, allowed, counted blocks, late-allows, "
                        "distinct destinations, first and last time (all time).",
    "dns_blocked_names": "DNS names the proxy refused, per host, with attempts (all time).",
    "late_allowed": "Destinations a blocked first attempt of which was let through on retry, "
                    "with the allow rule (all time).",
    "timeline": "Per host and UTC minute: events, allowed, counted blocks, superseded blocks, "
                "late-allows and refused DNS names (pruned with the rows).",
    "timeline_daily": "The timeline per UTC day, kept when rows are pruned.",
    "activity_minutes": "Rollup behind timeline: a count per event type per host and minute.",
    "activity_days": "Rollup behind timeline_daily: a count per event type per host and day.",
    "destination_minutes": "Rollup per host, address, port, protocol, event type, UTC minute, "
                           "destination, process and rule: events and counted rows, first "
                           "and last (pruned with the rows).",
    "destinations": "The same as destination_minutes over all time, kept when rows are pruned.",
    "late_keys": "The latest late-allow per host, address, port and protocol.",
    "audit_events_unrolled": "The classified records the rollups do not count yet (persist "
                             "adds them once records stop coming); the summary views add "
                             "them.",
    "destination_minutes_all": "destination_minutes and, as a group of one each, the records "
                               "it does not count yet: what a time window reads.",
    "rollup_progress": "The last audit_events id the rollups count (SQLite).",
}
QUERIES = {
    "blocked_last_day": {
        "title": "Blocked in the last 24 hours, per process",
        "sql": "SELECT host, destination, dst_ip, dst_port, protocol, process, "
               "SUM(counted) AS attempts, MIN(counted_first) AS first_seen, "
               "MAX(counted_last) AS last_seen FROM destination_minutes_all "
               "WHERE event_type IN ('connection_blocked', 'protocol_blocked') "
               "AND counted > 0 AND minute >= strftime('%Y-%m-%dT%H:%M', 'now', '-1 day') "
               "GROUP BY host, destination, dst_ip, dst_port, protocol, process "
               "ORDER BY attempts DESC",
    },
    "top_blocked": {
        "title": "Most blocked destinations",
        "sql": "SELECT * FROM blocked_destinations ORDER BY attempts DESC LIMIT 50",
    },
    "blocks_per_day": {
        "title": "Counted blocks per day",
        "sql": "SELECT host, day, blocked, superseded, allowed FROM timeline_daily "
               "ORDER BY day DESC, host",
    },
    "refused_names": {
        "title": "Refused DNS names",
        "sql": "SELECT * FROM dns_blocked_names ORDER BY attempts DESC",
    },
}


class BrowseError(SluiceError):
    exit_code = ExitCode.BAD_INPUT


def sqlite_path(url: str) -> Path:
    """The file of a sqlite:/// URL; BrowseError for anything Datasette cannot open."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] != "sqlite":
        raise BrowseError("sluice browse opens a SQLite store (Datasette reads SQLite); for "
                          "PostgreSQL use sluice query")
    path = Path(urllib.parse.unquote(rest.removeprefix("/").split("?", 1)[0]))
    if not path.name or str(path) == ":memory:":
        raise BrowseError(f"{url}: sluice browse needs a database file")
    if not path.is_file():
        raise BrowseError(f"{path}: no such store")
    return path


def metadata(database: str) -> dict:
    return {"title": "sluice audit store",
            "description": "Read-only. The views and rollup tables are described in the "
                           "README (Recording, replay and SQL).",
            "databases": {database: {
                "tables": {name: {"description": text} for name, text in DESCRIPTIONS.items()},
                "queries": QUERIES}}}


def serve(url: str, port: int) -> None:
    """Serve the store until interrupted."""
    path = sqlite_path(url)
    try:
        from datasette.cli import cli
    except ImportError:
        raise BrowseError("sluice browse needs Datasette: .venv/bin/pip install -e '.[browse]' "
                          "(./bootstrap installs it)") from None
    with tempfile.TemporaryDirectory(prefix="sluice-browse-") as tmp:
        meta = Path(tmp) / "metadata.json"
        meta.write_text(json.dumps(metadata(path.stem)))
        cli.main(["serve", str(path), "--host", LOOPBACK, "--port", str(port), "--metadata",
                  str(meta), "--setting", "sql_time_limit_ms", "5000"],
                 prog_name="sluice browse", standalone_mode=False)
