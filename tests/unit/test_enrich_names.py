"""enrich's naming logic, pure: PTR names, the attempted set, held events, resolution order."""

import pytest

from pipeline.events import DnsMapping
from pipeline.names.namer import AttemptedSet, HeldEvents, LookupBudget, Namer, ptr_hostname
from pipeline.policy.load import policy_from_document
from pipeline.policy.namecache import HostnameCache

T0 = 1_764_000_000_000_000_000
S = 1_000_000_000
DAY = 24 * 3600 * S

POLICY = policy_from_document({"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": "allowed.example", "action": "allow"},
    {"type": "hostname", "value": "*.cdn.example", "action": "allow"},
    {"type": "hostname", "value": "exact.example", "action": "deny"},
    {"type": "hostname", "value": "tracked.example", "action": "allow"},
]}, "test")


@pytest.mark.parametrize("answer, expected", [
    ("Web-3.Allowed.Example.", "allowed.example"),   # parent rule: reported as the parent
    ("allowed.example.", "allowed.example"),
    ("edge-1.cdn.example.", "edge-1.cdn.example"),   # pattern: the full name stays
    ("EXACT.example", "exact.example"),              # no trailing dot: nothing to strip
    ("unrelated.example.", "unrelated.example"),     # no rule: the name as it is
    ("host.example..", "host.example."),             # only one dot goes
    (".", ""),
    ("", ""),
])
def test_ptr_answers_become_destination_names(answer, expected):
    assert ptr_hostname(answer, POLICY) == expected


def test_attempted_set_forgets_the_oldest_beyond_capacity():
    attempted = AttemptedSet(capacity=3)
    for ip in ("a", "b", "c", "a", "d"):
        attempted.add(ip)
    assert [ip in attempted for ip in "abcd"] == [False, True, True, True]
    attempted.discard("c")
    attempted.discard("never")
    assert len(attempted) == 2 and "c" not in attempted


@pytest.mark.parametrize("steps, released, held", [
    # (ip, event, begin) in order; what hold() let go; what stays held per address
    ([("a", 1, True), ("a", 2, False), ("b", 3, True)], [], {"a": [1, 2], "b": [3]}),
    # full (limit 3): a new address pushes out the one that waited longest, in order
    ([("a", 1, True), ("a", 2, False), ("b", 3, True), ("c", 4, True)],
     [1, 2], {"b": [3], "c": [4]}),
    # full, and the event's own address is the one let go: it follows its elders out
    ([("a", 1, True), ("b", 2, True), ("c", 3, True), ("a", 4, False)],
     [1, 4], {"b": [2], "c": [3]}),
])
def test_held_events_stay_within_their_limit_in_order(steps, released, held):
    waiting = HeldEvents(limit=3)
    let_go = []
    for ip, event, begin in steps:
        let_go += waiting.hold(ip, event, begin=begin)
    assert let_go == released
    assert {ip: waiting.release(ip) for ip in waiting} == held
    assert waiting.count == 0 and waiting.release("a") == []


def test_the_lookup_budget_allows_a_burst_then_its_rate():
    budget = LookupBudget(rate=4.0, burst=3)
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert budget.take(100.125) is False  # half a token back
    assert budget.take(100.25) is True
    assert [budget.take(200.0) for _ in range(4)] == [True, True, True, False], \
        "a long quiet refills it to the burst, no further"


def test_an_event_from_before_the_latest_neither_refills_nor_drains_the_budget():
    budget = LookupBudget(rate=4.0, burst=1)
    assert budget.take(100.0) is True
    assert budget.take(99.0) is False  # out of order: no time passed for the budget
    assert budget.take(100.25) is True


def test_held_events_need_room_for_one():
    with pytest.raises(ValueError):
        HeldEvents(limit=0)


def mapping(name, *ips, chain=(), ttl=60, at=T0):
    return DnsMapping(name, list(ips), ttl, list(chain), at)


def test_mappings_name_addresses_and_a_cname_origin_overrides():
    namer = Namer(POLICY)
    namer.learn(mapping("www.site.example", "1.1.1.1"))
    chain = ["origin.example", "edge.cdn.example"]
    namer.learn(mapping("edge.cdn.example", "2.2.2.2", chain=["Origin.Example", chain[1]], ttl=30))
    assert namer.name_of("1.1.1.1", T0) == ("www.site.example", [])
    assert namer.name_of("2.2.2.2", T0) == ("origin.example", chain)
    assert namer.name_of("3.3.3.3", T0) == ("", [])
    # A chain outlives its TTL (at least 5 minutes) as the only one known for the address.
    assert namer.name_of("2.2.2.2", T0 + 3600 * S)[0] == "origin.example"


def test_a_lookup_is_wanted_once_for_an_address_nothing_names():
    namer = Namer(POLICY)
    namer.learn(mapping("known.example", "1.1.1.1"))
    assert not namer.wants_lookup("1.1.1.1")
    assert namer.wants_lookup("9.9.9.9")
    namer.attempted.add("9.9.9.9")
    assert not namer.wants_lookup("9.9.9.9")


def test_the_forward_match_names_an_address_whose_exact_entry_aged_out():
    namer = Namer(POLICY, HostnameCache(capacity=1))
    namer.learn(mapping("tracked.example", "9.9.9.9"))
    namer.learn(mapping("other.example", "8.8.8.8", at=T0 + 2 * DAY))
    assert "9.9.9.9" not in namer.cache.names
    assert not namer.wants_lookup("9.9.9.9")
    assert namer.name_of("9.9.9.9", T0) == ("tracked.example", [])


@pytest.mark.parametrize("answer, expected", [
    ("web-3.allowed.example.", "allowed.example"),   # the name a rule tracks it by
    ("", ""),
])
def test_a_finished_lookup_names_the_address(answer, expected):
    namer = Namer(POLICY)
    assert namer.lookup_ended("9.9.9.9", answer, T0) == expected
    assert namer.name_of("9.9.9.9", T0) == (expected, [])


def test_a_mapping_that_arrived_during_the_lookup_wins():
    namer = Namer(POLICY)
    namer.learn(mapping("dns.example", "9.9.9.9"))
    assert namer.lookup_ended("9.9.9.9", "ptr.example.", T0) == ""
    assert namer.name_of("9.9.9.9", T0) == ("dns.example", [])


def test_a_new_policy_changes_which_name_a_ptr_answer_is_reported_as():
    namer = Namer(POLICY)
    namer.set_policy(policy_from_document({"rules": [
        {"type": "hostname", "value": "web-3.allowed.example", "action": "allow"}]}, "new"))
    assert namer.lookup_ended("9.9.9.9", "Web-3.Allowed.Example.", T0) == "web-3.allowed.example"
