"""Put a report together: the store's facts, the policy the pipeline ran with, the posture."""

from __future__ import annotations

from pathlib import Path

from ..audit.records import sql_timestamp
from ..policy.load import ENV_RULE_LISTS, ENV_SETTINGS
from .data import read_facts
from .render import Report
from .suggestion import suggest


def policy_source(settings) -> tuple[str, str | None, dict[str, str]]:
    """("environment", None, its variables) or (file path, its text or None, {})."""
    if any(getattr(settings, name).strip() for name in ENV_SETTINGS):
        return "environment", None, {variable: getattr(settings, attr)
                                     for attr, variable, *_ in ENV_RULE_LISTS}
    try:
        return str(settings.policy), Path(settings.policy).read_text(encoding="utf-8"), {}
    except (OSError, UnicodeDecodeError):
        return str(settings.policy), None, {}


def make_report(settings, *, host: str, mode: str, since_ns: int | None, now_ns: int,
                posture: dict | None) -> Report:
    facts = read_facts(settings.db, host, since_ns)
    source, text, environment = policy_source(settings)
    return Report(host, mode, sql_timestamp(since_ns) if since_ns is not None else None,
                  sql_timestamp(now_ns), facts, posture,
                  suggest(facts.blocked, source, text, environment))
