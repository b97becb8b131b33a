"""For one parsed query, what the proxy does: a local reply, the cached answer or a forward
(pipeline/dns/triage.py), table by table."""

from __future__ import annotations

import dataclasses

import dns.message
import dns.opcode
import pytest

from pipeline.dns import packets
from pipeline.dns.triage import CACHED, FORWARD, LOCAL, Triage, triage


def query(opcode=dns.opcode.QUERY, question=True) -> packets.Query:
    message = dns.message.make_query("www.example.test", "A")
    message.set_opcode(opcode)
    parsed = packets.parse_query(message.to_wire())
    return parsed if question else dataclasses.replace(parsed, question=b"")


@pytest.mark.parametrize("case, kwargs, expected", [
    ("an allowed, uncached question is forwarded",
     {}, Triage(FORWARD)),
    ("an allowed, cached question gets the cached answer",
     {"cached": True}, Triage(CACHED, counter="cache_hits")),
    ("a refused question is refused locally in enforce mode, cached or not",
     {"refused": True, "cached": True},
     Triage(LOCAL, packets.REFUSED, "refused", blocked=True)),
    ("audit mode records a refused question and forwards it",
     {"refused": True, "audit_mode": True}, Triage(FORWARD, blocked=True)),
    ("audit mode records a refused question and answers it from the cache",
     {"refused": True, "audit_mode": True, "cached": True},
     Triage(CACHED, counter="cache_hits", blocked=True)),
    ("too many in flight: SERVFAIL, even with a cached answer",
     {"overloaded": True, "cached": True},
     Triage(LOCAL, packets.SERVFAIL, "overloaded")),
    ("a refusal beats an overload",
     {"overloaded": True, "refused": True},
     Triage(LOCAL, packets.REFUSED, "refused", blocked=True)),
    ("an overloaded audit-mode refusal is recorded and SERVFAILed",
     {"overloaded": True, "refused": True, "audit_mode": True},
     Triage(LOCAL, packets.SERVFAIL, "overloaded", blocked=True)),
])
def test_a_query_of_the_usual_opcode(case, kwargs, expected):
    arguments = {"refused": False, "audit_mode": False, "overloaded": False, "cached": False}
    assert triage(query(), **{**arguments, **kwargs}) == expected, case


@pytest.mark.parametrize("refused", [False, True])
def test_another_opcode_is_not_implemented_and_never_recorded(refused):
    decided = triage(query(dns.opcode.NOTIFY), refused=refused, audit_mode=False,
                     overloaded=True, cached=True)
    assert decided == Triage(LOCAL, packets.NOTIMP, "not_implemented")


def test_a_query_without_a_question_is_forwarded_and_never_recorded_or_cached():
    decided = triage(query(question=False), refused=True, audit_mode=False, overloaded=False,
                     cached=True)
    assert decided == Triage(FORWARD)
