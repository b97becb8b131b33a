"""Loading a policy: cargowall's JSON file or the SLUICE_* environment form.

Validation is strict where cargowall fails open (reference §3.2): every problem in a source
is collected, one line each naming the source, the rule position and the field, and the load
fails as a whole so the previous policy stays in force.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .. import limited
from ..errors import PolicyError
from .cidrs import canonical_cidr
from .envform import split_entry, split_list
from .hostnames import hostname_problem
from .model import Policy
from .ports import union_ports
from .rules import ACTIONS, RULE_TYPES, Rule
from .searchdomains import normalize_search_domains, search_domain_problem
from .verdict import PROTOCOLS, PortSpec

log = logging.getLogger("policy")

ENVIRONMENT = "environment"
MAX_POLICY_BYTES = 16 << 20  # about 150,000 rules
MAX_POLICY_DEPTH = 16

# (settings attribute, variable, rule type, action) in cargowall's creation order, so a host
# that is both allowed and blocked ends up denied (the later exact rule wins).
ENV_RULE_LISTS = (
    ("allowed_hosts", "SLUICE_ALLOWED_HOSTS", "hostname", "allow"),
    ("allowed_cidrs", "SLUICE_ALLOWED_CIDRS", "cidr", "allow"),
    ("blocked_hosts", "SLUICE_BLOCKED_HOSTS", "hostname", "deny"),
    ("blocked_cidrs", "SLUICE_BLOCKED_CIDRS", "cidr", "deny"),
)
ENV_SETTINGS = ("default_action", *(attr for attr, *_ in ENV_RULE_LISTS), "search_domains")


class InvalidPolicy(PolicyError):
    """Every problem of one policy source; str() is the first, `lines` holds them all."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__(lines[0])
        self.lines = tuple(lines)


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, text: str) -> None:
        self.lines.append(f"{where}: {text}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise InvalidPolicy(self.lines)


def _quote(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _alternatives(allowed: Sequence[str]) -> str:
    return ", ".join(allowed[:-1]) + " or " + allowed[-1]


def _choice(raw: Any, allowed: Sequence[str], what: str, where: str,
            problems: _Problems) -> str | None:
    if raw is None or raw == "":
        problems.add(where, f"missing {what} (use {_alternatives(allowed)})")
        return None
    if raw not in allowed:
        problems.add(where, f"unknown {what} {_quote(raw)} (use {_alternatives(allowed)})")
        return None
    return str(raw)


# ------------------------------------------------------------------ entry points


def load_policy(settings: Any) -> Policy:
    """The policy a stage starts with: the environment form when any of its settings is
    non-empty (the file is then ignored, and a line says so), else settings.policy."""
    env_policy = policy_from_settings(settings)
    if env_policy is not None:
        log.info("policy from SLUICE_* environment variables; %s is not read", settings.policy)
        return env_policy
    return load_policy_file(settings.policy)


def load_policy_file(path: str | Path) -> Policy:
    try:
        text = limited.read_text(path, max_bytes=MAX_POLICY_BYTES)
    except OSError as err:
        raise InvalidPolicy([f"{path}: cannot read: {err.strerror or err}"]) from None
    except limited.LimitError as err:
        raise InvalidPolicy([f"{path}: {err}"]) from None
    return policy_from_text(text, str(path))


def policy_from_text(text: str, source_name: str) -> Policy:
    """A policy from the text of a cargowall JSON policy; keys match case-insensitively.
    Nesting is limited before the decoder sees it (a policy is 4 levels deep)."""
    problem = limited.nesting_problem(text, MAX_POLICY_DEPTH)
    if problem:
        raise InvalidPolicy([f"{source_name}: {problem}"])
    try:
        document = json.loads(text, object_pairs_hook=_fold_keys)
    except json.JSONDecodeError as err:
        where = f"{source_name}:{err.lineno}:{err.colno}"
        raise InvalidPolicy([f"{where}: invalid JSON: {err.msg}"]) from None
    return policy_from_document(document, source_name)


def _fold_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Go's decoder matches struct fields case-insensitively; a later spelling wins.
    return {key.lower(): value for key, value in pairs}


def policy_from_document(document: Any, source: str) -> Policy:
    """A policy from decoded JSON whose object keys are already lowercased."""
    problems = _Problems()
    if not isinstance(document, dict):
        raise InvalidPolicy([f"{source}: expected a JSON object with defaultAction and rules"])
    default_action = _default_action(document.get("defaultaction"), f"{source}: defaultAction",
                                     problems)
    rules = [_json_rule(raw, f"{source}: rules[{i}]", problems)
             for i, raw in enumerate(_json_list(document.get("rules"), f"{source}: rules",
                                                problems))]
    raw_domains = _json_list(document.get("searchdomains"), f"{source}: searchDomains", problems)
    domains = _search_domains(raw_domains, lambda i: f"{source}: searchDomains[{i}]", problems)
    problems.raise_if_any()
    return Policy(default_action, merge_duplicates(rules), domains, source)


def policy_from_settings(settings: Any) -> Policy | None:
    """The environment form from the settings values, or None when all six are empty."""
    if not any(getattr(settings, name).strip() for name in ENV_SETTINGS):
        return None
    problems = _Problems()
    default_action = _default_action(settings.default_action.strip(), "SLUICE_DEFAULT_ACTION",
                                     problems)
    rules = []
    for attr, variable, rule_type, action in ENV_RULE_LISTS:
        for entry in split_list(getattr(settings, attr)):
            rules.append(_env_rule(entry, variable, rule_type, action, problems))
    raw_domains = settings.search_domains.split(",") if settings.search_domains.strip() else []
    domains = _search_domains(raw_domains, lambda i: f"SLUICE_SEARCH_DOMAINS[{i}]", problems)
    problems.raise_if_any()
    return Policy(default_action, merge_duplicates(rules), domains, ENVIRONMENT)


# ------------------------------------------------------------------ pieces


def _default_action(raw: Any, where: str, problems: _Problems) -> str:
    if raw is None or raw == "":
        return "deny"
    return _choice(raw, ACTIONS, "action", where, problems) or "deny"


def _json_list(raw: Any, where: str, problems: _Problems) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(where, f"expected a list, found {_quote(raw)}")
        return []
    return raw


def _json_rule(raw: Any, where: str, problems: _Problems) -> Rule | None:
    if not isinstance(raw, dict):
        problems.add(where, "expected an object with type, value, action and ports")
        return None
    rule_type = _choice(raw.get("type"), RULE_TYPES, "type", f"{where}.type", problems)
    action = _choice(raw.get("action"), ACTIONS, "action", f"{where}.action", problems)
    raw_value = raw.get("value")
    if not isinstance(raw_value, str) or not raw_value.strip():
        problems.add(f"{where}.value", f"expected a hostname or CIDR, found {_quote(raw_value)}")
        raw_value = None
    ports = _json_ports(raw.get("ports"), f"{where}.ports", problems)
    auto_type = raw.get("autoaddedtype") or ""
    if not isinstance(auto_type, str):
        problems.add(f"{where}.autoAddedType", f"expected a string, found {_quote(auto_type)}")
        return None
    if rule_type is None or action is None or raw_value is None or ports is None:
        return None
    return _checked_rule(rule_type, raw_value, action, ports, auto_type,
                         lambda field: f"{where}.{field}", problems)


def _json_ports(raw: Any, where: str, problems: _Problems) -> tuple[PortSpec, ...] | None:
    if raw is not None and not isinstance(raw, list):
        problems.add(where, f"expected a list of {{port, protocol}} objects, found {_quote(raw)}")
        return None
    specs = [_json_port(entry, f"{where}[{j}]", problems) for j, entry in enumerate(raw or [])]
    valid = [spec for spec in specs if spec is not None]
    return tuple(dict.fromkeys(valid)) if len(valid) == len(specs) else None


def _json_port(raw: Any, where: str, problems: _Problems) -> PortSpec | None:
    if not isinstance(raw, dict):
        problems.add(where, "expected an object with port and protocol")
        return None
    protocol = _choice(raw.get("protocol"), PROTOCOLS, "protocol", f"{where}.protocol", problems)
    port = raw.get("port", 0 if protocol == "icmp" else None)
    if port is None:
        problems.add(f"{where}.port", "missing port")
    elif isinstance(port, bool) or not isinstance(port, int):
        problems.add(f"{where}.port", f"expected a whole number, found {_quote(port)}")
    elif not 0 <= port <= 65535:
        problems.add(f"{where}.port", f"port {port} is outside 0-65535")
    elif protocol == "icmp" and port != 0:
        problems.add(f"{where}.port", f"icmp has no ports: use 0 or leave it out, not {port}")
    elif protocol is not None:
        return PortSpec(port, protocol)
    return None


def _env_rule(entry: str, variable: str, rule_type: str, action: str,
              problems: _Problems) -> Rule | None:
    where = f"{variable}: {_quote(entry)}"
    try:
        host, ports = split_entry(entry)
    except ValueError as err:
        problems.add(where, str(err))
        return None
    specs = tuple(dict.fromkeys(PortSpec(port, "all") for port in ports))
    return _checked_rule(rule_type, host, action, specs, "", lambda field: where, problems)


def _checked_rule(rule_type: str, raw_value: str, action: str, ports: tuple[PortSpec, ...],
                  auto_type: str, where: Callable[[str], str], problems: _Problems) -> Rule | None:
    """The normalized rule, or None after reporting why its value cannot be used."""
    if rule_type == "hostname":
        value = raw_value.strip().lower()
        problem = hostname_problem(value)
    else:
        value = canonical_cidr(raw_value) or ""
        problem = None if value else f"invalid CIDR {_quote(raw_value)}"
    if problem:
        problems.add(where("value"), problem)
        return None
    if rule_type == "cidr" and ":" in value:
        for j, spec in enumerate(ports):
            if spec.protocol == "icmp":
                problems.add(where(f"ports[{j}].protocol"),
                             f"icmp is IPv4-only, not for the IPv6 CIDR {value} "
                             "(ICMPv6 always passes)")
    return Rule(rule_type, value, action, ports, auto_type)


def _search_domains(raw: Iterable[Any], where: Callable[[int], str],
                    problems: _Problems) -> list[str]:
    domains = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, str):
            problems.add(where(i), f"expected a string, found {_quote(entry)}")
            continue
        domain = normalize_search_domains([entry])[0]
        problem = search_domain_problem(domain)
        if problem:
            problems.add(where(i), problem)
        else:
            domains.append(domain)
    return list(dict.fromkeys(domains))


def merge_duplicates(rules: Iterable[Rule | None]) -> list[Rule]:
    """Rules equal in (type, value, action) become one at the first one's position, with
    the union of their ports and the first one's autoAddedType (reference §3.4)."""
    merged: dict[tuple[str, str, str], Rule] = {}
    for rule in rules:
        if rule is None:
            continue
        key = (rule.type, rule.value, rule.action)
        first = merged.get(key)
        merged[key] = rule if first is None else Rule(
            first.type, first.value, first.action, union_ports(first.ports, rule.ports),
            first.auto_added_type)
    return list(merged.values())
