"""AnswerNames: the policy stage's memory of which answer opened which address."""

from pipeline.names.answers import MIN_TTL_S, AnswerNames

S = 1_000_000_000


def test_the_latest_live_answer_names_its_addresses():
    names = AnswerNames()
    names.opened("a.example", [], ["10.0.0.1", "10.0.0.2"], 300, 0)
    names.opened("b.example", ["b.example", "edge.test"], ["10.0.0.2"], 300, 1 * S)
    assert names.name_of("10.0.0.1", 2 * S) == ("a.example", [])
    assert names.name_of("10.0.0.2", 2 * S) == ("b.example", ["b.example", "edge.test"])
    assert names.name_of("10.0.0.3", 2 * S) is None


def test_an_answer_names_for_its_ttl_and_at_least_a_minute():
    names = AnswerNames()
    names.opened("long.example", [], ["10.0.0.1"], 600, 0)
    names.opened("zero.example", [], ["10.0.0.2"], 0, 0)
    assert names.name_of("10.0.0.2", (MIN_TTL_S - 1) * S) == ("zero.example", [])
    assert names.name_of("10.0.0.2", MIN_TTL_S * S) is None
    assert names.name_of("10.0.0.1", 599 * S) == ("long.example", [])
    assert names.name_of("10.0.0.1", 600 * S) is None and len(names) == 0


def test_the_least_recently_opened_address_is_forgotten_first():
    names = AnswerNames(capacity=2)
    names.opened("a.example", [], ["10.0.0.1", "10.0.0.2"], 300, 0)
    names.opened("a.example", [], ["10.0.0.1"], 300, 0)   # opened again: now the newest
    names.opened("c.example", [], ["10.0.0.3"], 300, 0)
    assert len(names) == 2 and names.name_of("10.0.0.2", 0) is None
    assert names.name_of("10.0.0.1", 0) == ("a.example", [])
