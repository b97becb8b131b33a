"""FingerprintSet: notify's memory of alerted destinations, 8 bytes a key."""

import tracemalloc

from pipeline.fingerprints import FingerprintSet


def _keys(n: int, start: int = 0):
    return (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:{i % 60000 + 1}"
            for i in range(start, start + n))


def test_add_reports_whether_the_key_was_new():
    keys = FingerprintSet(["old.example:443"])
    assert "old.example:443" in keys
    assert keys.add("a.example:443")
    assert not keys.add("a.example:443")
    assert not keys.add("old.example:443")
    assert "b.example:443" not in keys and 42 not in keys
    assert len(keys) == 2


def test_every_key_stays_through_growth():
    keys = FingerprintSet()
    assert all(keys.add(key) for key in _keys(50_000))
    assert len(keys) == 50_000
    assert all(key in keys for key in _keys(50_000))
    assert not any(key in keys for key in _keys(50_000, start=50_000))


def test_a_discarded_key_is_gone_and_its_neighbours_stay():
    keys = FingerprintSet(_keys(3_000))
    for key in _keys(1_000):
        keys.discard(key)
    keys.discard("never.example:1")
    assert len(keys) == 2_000
    assert not any(key in keys for key in _keys(1_000))
    assert all(key in keys for key in _keys(2_000, start=1_000)), "probe runs cross markers"
    assert all(keys.add(key) for key in _keys(1_000)), "a discarded key can come back"
    assert len(keys) == 3_000


def test_adds_and_discards_in_turn_do_not_fill_the_table():
    keys = FingerprintSet()
    for round_ in range(20):  # markers of discarded keys are dropped on a rehash
        batch = list(_keys(1_000, start=round_ * 1_000))
        for key in batch:
            keys.add(key)
        for key in batch:
            keys.discard(key)
    assert len(keys) == 0
    assert keys.add("a.example:443") and "a.example:443" in keys


def test_a_hundred_thousand_keys_take_two_mib():
    """A set of str holds the same keys in about 9.4 MiB."""
    tracemalloc.start()
    try:
        keys = FingerprintSet(_keys(100_000))
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(keys) == 100_000
    assert held < 2.5 * 2**20 and peak < 4 * 2**20, (held, peak)
