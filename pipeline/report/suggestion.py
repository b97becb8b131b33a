"""The allowlist additions that would let a run's blocked destinations through, as a diff.

The rules come from the `suggest` engine (pipeline/audit/suggest.py: names get hostname rules,
addresses CIDR rules, siblings grouped where no public suffix is opened). The diff is of the
policy the pipeline ran with: for a policy file, the file's JSON with the rules appended
(both sides written with two-space indentation, so `git apply` takes it for a file kept in
that form, and the `+` lines paste into any other); for the environment form, the
SLUICE_ALLOWED_HOSTS / SLUICE_ALLOWED_CIDRS lines with the entries appended (that form has
no protocols: a port there opens it for TCP and UDP alike).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
from collections.abc import Iterable, Mapping

from ..audit.suggest import RULE_PROTOCOLS, Seen, draft_policy
from .data import Blocked


@dataclasses.dataclass(frozen=True)
class Suggestion:
    rules: list[dict]
    diff: str
    not_drafted: list[str]   # blocked destinations no rule can allow (GRE and the like)


def seen_of(blocked: Iterable[Blocked]) -> tuple[list[Seen], list[str]]:
    seen, left_out = set(), []
    for b in blocked:
        protocol = RULE_PROTOCOLS.get(b.protocol)
        address = _address(b.destination)
        if protocol is None:
            left_out.append(f"{b.key} ({b.protocol}): only TCP, UDP and ICMP can be allowed")
        elif protocol == "icmp":
            if address is not None and address.version == 4:  # ICMPv6 always passes
                seen.add(Seen("", b.destination, 0, "icmp"))
        elif address is not None:
            seen.add(Seen("", b.destination, b.port, protocol))
        else:
            seen.add(Seen(b.destination.lower().rstrip("."), "", b.port, protocol))
    return sorted(seen, key=dataclasses.astuple), left_out


def _address(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def suggest(blocked: list[Blocked], source: str, policy_text: str | None,
            environment: Mapping[str, str]) -> Suggestion:
    """source: the policy file's path, or "environment"; policy_text: that file's text
    (None when it cannot be read); environment: the SLUICE_* policy variables."""
    seen, left_out = seen_of(blocked)
    rules = draft_policy(seen)["rules"] if seen else []
    if not rules:
        return Suggestion([], "", left_out)
    if source == "environment":
        diff = environment_diff(environment, rules)
    else:
        diff = file_diff(source, policy_text, rules)
    return Suggestion(rules, diff, left_out)


def file_diff(path: str, text: str | None, rules: list[dict]) -> str:
    try:
        document = json.loads(text) if text is not None else None
    except ValueError:
        document = None
    if not isinstance(document, dict):
        document = {"defaultAction": "deny", "rules": []}
    key = next((k for k in document if k.lower() == "rules"), "rules")
    before = json.dumps(document, indent=2) + "\n"
    after_document = dict(document)
    after_document[key] = [*(document.get(key) or []), *rules]
    after = json.dumps(after_document, indent=2) + "\n"
    name = path.lstrip("/")
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        f"a/{name}", f"b/{name}"))


def environment_diff(environment: Mapping[str, str], rules: list[dict]) -> str:
    added: dict[str, list[str]] = {"SLUICE_ALLOWED_HOSTS": [], "SLUICE_ALLOWED_CIDRS": []}
    for rule in rules:
        ports = sorted({p["port"] for p in rule.get("ports", []) if p["protocol"] != "icmp"})
        if rule.get("ports") and not ports:
            continue  # ICMP alone: the environment form cannot say it (a policy file can)
        if rule["type"] == "hostname":
            added["SLUICE_ALLOWED_HOSTS"].append(_entry(rule["value"], ports))
        else:
            host = rule["value"].split("/")[0] if rule["value"].endswith(("/32", "/128")) \
                else rule["value"]
            added["SLUICE_ALLOWED_CIDRS"].append(_entry(host, ports))
    lines = []
    for variable, entries in added.items():
        if not entries:
            continue
        current = environment.get(variable, "").strip()
        new = ",".join([current, *entries] if current else entries)
        if current:
            lines.append(f"-{variable}={current}\n")
        lines.append(f"+{variable}={new}\n")
    return "".join(lines)


def _entry(host: str, ports: list[int]) -> str:
    if not ports:
        return host
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{';'.join(map(str, ports))}"
