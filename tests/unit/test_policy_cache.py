"""IP <-> hostname knowledge from DNS answers, with time passed in (reference §3.10)."""

import pytest

from pipeline.policy.namecache import HostnameCache

DAY = 24 * 3600.0


def cache(*tracked, capacity=10_000):
    names = HostnameCache(capacity=capacity)
    names.set_tracked(tracked)
    return names


@pytest.mark.parametrize("mappings, ip, expected", [
    ([("GitHub.com", "1.2.3.4")], "1.2.3.4", "github.com"),
    ([("a.com", "1.2.3.4"), ("b.com", "1.2.3.4")], "1.2.3.4", "b.com"),
    ([("a.com", "")], "", ""),
    ([("a.com", "1.2.3.4")], "5.6.7.8", ""),
])
def test_reverse_lookup_last_writer_wins(mappings, ip, expected):
    names = cache()
    for name, address in mappings:
        names.update_dns_mapping(name, address, now=0)
    assert names.lookup_hostname_by_ip(ip) == expected


def test_tracked_hostnames_collect_their_addresses_and_answer_forward_matches():
    names = cache("github.com")
    names.update_dns_mapping("github.com", "1.2.3.4", now=0)
    names.update_dns_mapping("github.com", "1.2.3.4", now=1)
    names.update_dns_mapping("github.com", "1.2.3.5", now=2)
    names.update_dns_mapping("other.com", "9.9.9.9", now=3)
    assert names.ips_for("github.com") == ("1.2.3.4", "1.2.3.5")
    assert names.ips_for("other.com") == ()
    assert names.forward_match_ip("1.2.3.5") == "github.com"
    assert names.forward_match_ip("9.9.9.9") == ""


def test_tracked_lists_survive_a_reload_for_names_still_tracked():
    names = cache("a.com", "b.com")
    names.update_dns_mapping("a.com", "1.1.1.1", now=0)
    names.update_dns_mapping("b.com", "2.2.2.2", now=0)
    names.set_tracked(["a.com", "c.com"])
    assert (names.ips_for("a.com"), names.ips_for("b.com")) == (("1.1.1.1",), ())
    assert names.forward_match_ip("2.2.2.2") == ""


def test_lookup_falls_back_to_tracked_lists_after_ageing():
    names = cache("a.com", capacity=1)
    names.update_dns_mapping("a.com", "1.1.1.1", now=0)
    names.update_dns_mapping("b.com", "2.2.2.2", now=DAY + 1)
    assert len(names) == 1
    assert names.lookup_hostname_by_ip("1.1.1.1") == "a.com"


@pytest.mark.parametrize("times, now, remaining", [
    ([0, 1, 2], 10, 4),                       # over capacity, but nothing is a day old
    ([0, 1, 2], DAY + 1.5, 2),                # the two older than 24 h go
    ([0, DAY, DAY + 1], DAY + 2, 3),          # only those: the cache stays above capacity
])
def test_ageing_only_drops_entries_older_than_a_day_when_over_capacity(times, now, remaining):
    names = cache(capacity=2)
    for i, seen in enumerate(times):
        names.update_dns_mapping(f"h{i}.com", f"10.0.0.{i}", now=seen)
    names.update_dns_mapping("late.com", "10.0.1.1", now=now)
    assert len(names) == remaining


def test_ageing_drops_cname_records_with_the_address():
    names = cache(capacity=1)
    names.update_dns_mapping("a.com", "1.1.1.1", now=0)
    names.record_cname_chain("1.1.1.1", ["origin.com", "a.com"], ttl=60, now=0)
    names.update_dns_mapping("b.com", "2.2.2.2", now=DAY + 1)
    assert names.cname_chain("1.1.1.1", now=DAY + 1) == ()


CNAMES = [
    # (records as (chain, ttl, time), now, expected chain)
    ([(["A.com", "cdn.net"], 60, 0)], 10, ("a.com", "cdn.net")),
    ([(["a.com", "cdn.net"], 60, 0), (["b.com", "cdn.net"], 60, 5)], 10, ("b.com", "cdn.net")),
    ([(["a.com", "x.net"], 3600, 0), (["b.com", "y.net"], 0, 5)], 400, ("a.com", "x.net")),
    ([(["a.com", "x.net"], 0, 0), (["b.com", "y.net"], 0, 5)], 1000, ("b.com", "y.net")),
    ([(["a.com", "x.net"], 60, 5), (["b.com", "y.net"], 60, 5)], 10, ("b.com", "y.net")),
    ([(["a.com", "x.net"], 60, 0), (["b.com", "y.net"], 60, 5), (["a.com", "z.net"], 60, 9)],
     10, ("a.com", "z.net")),
    ([([], 60, 0)], 10, ()),
]


@pytest.mark.parametrize("records, now, expected", CNAMES)
def test_cname_origin_records(records, now, expected):
    names = cache()
    for chain, ttl, seen in records:
        names.record_cname_chain("1.1.1.1", chain, ttl=ttl, now=seen)
    assert names.cname_chain("1.1.1.1", now=now) == expected


def test_at_most_eight_origins_per_address_least_recently_seen_evicted():
    names = cache()
    for i in range(9):
        names.record_cname_chain("1.1.1.1", [f"o{i}.com", "cdn.net"], ttl=60, now=i)
    names.record_cname_chain("1.1.1.1", ["o1.com", "cdn.net"], ttl=60, now=20)
    origins = [r.chain[0] for r in names.cnames["1.1.1.1"]]
    assert origins == [f"o{i}.com" for i in range(1, 9)]
    assert names.cname_chain("1.1.1.1", now=21) == ("o1.com", "cdn.net")
