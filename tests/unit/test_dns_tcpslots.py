"""The DNS proxy's TCP slots: a share per client address, the longest-idle slot taken."""

from pipeline.dns.tcpslots import Admission, Held, make_room


def held(*spec):
    """(key, address, idle_since or None)"""
    return [Held(*item) for item in spec]


def test_room_left_admits_without_taking_anything():
    assert make_room("a", held(("x", "b", 1.0)), total=4, per_address=2) == Admission(True)


def test_an_address_at_its_share_gives_up_its_own_longest_idle_slot():
    slots = held(("a1", "a", 5.0), ("a2", "a", 2.0), ("b1", "b", 1.0))
    assert make_room("a", slots, total=10, per_address=2) == Admission(True, "a2")


def test_when_full_the_address_holding_most_gives_up_its_longest_idle_slot():
    slots = held(("a1", "a", 5.0), ("a2", "a", 3.0), ("a3", "a", 4.0), ("b1", "b", 1.0))
    assert make_room("c", slots, total=4, per_address=3) == Admission(True, "a2")


def test_busy_connections_are_never_taken():
    slots = held(("a1", "a", None), ("a2", "a", None))
    assert make_room("a", slots, total=10, per_address=2) == Admission(False)
    assert make_room("c", slots, total=2, per_address=2) == Admission(False)
    slots = held(("a1", "a", None), ("b1", "b", 9.0))
    assert make_room("c", slots, total=2, per_address=2) == Admission(True, "b1")
