"""Policies and port lists written as short strings, for the tests of the policy package and
of what consumes a policy (the map writer, auto-allow, start-up connections, explain)."""

from pipeline.policy.cidrs import canonical_cidr
from pipeline.policy.load import policy_from_document
from pipeline.policy.verdict import PortSpec


def make_policy(*specs, domains=(), default="deny"):
    """Rules as "action value [port/proto ...]"; a value that parses as a CIDR is a cidr rule."""
    rules = [{"type": "cidr" if canonical_cidr(value) else "hostname", "value": value,
              "action": action, "ports": [port_json(p) for p in ports]}
             for action, value, *ports in (spec.split() for spec in specs)]
    return policy_from_document({"defaultaction": default, "rules": rules,
                                 "searchdomains": list(domains)}, "test")


def port_json(text):
    port, _, protocol = text.rpartition("/")
    return {"port": int(port or 0), "protocol": protocol}


def specs(text):
    return tuple(PortSpec(int(p or 0), proto)
                 for p, _, proto in (item.rpartition("/") for item in text.split()))
