"""The DNS proxy's pure logic, table by table: addresses, query parsing, filter, cache, CNAMEs,
enforcement plans, and the /proc/net reading behind a bind failure."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.rrset
import pytest

from pipeline.dns import packets
from pipeline.dns.answers import AnswerFacts, CnameRecord, answer_facts
from pipeline.dns.cache import MAX_LIFETIME, ResponseCache, lifetime
from pipeline.dns.cnames import MAX_REACH, Hop, LearnedTargets, effective_ttl, walk_chain
from pipeline.dns.confirmed import ConfirmedOpen
from pipeline.dns.endpoints import (Endpoint, choose_upstream, default_upstream, nameservers,
                                    parse_endpoint, parse_listen)
from pipeline.dns.enforce import AllowAsk, PreResolveMemory, plan_answer
from pipeline.dns.holders import holder_inodes
from pipeline.dns.queryfilter import (DEFAULT_ALLOW, LEARNED, PTR, REFUSE, RULE, SEARCH_DOMAIN,
                                      PolicyMemory, is_canonical_reverse_name, judge_query,
                                      passes_by_policy)
from pipeline.policy.load import policy_from_text
from pipeline.policy.verdict import PortSpec

TCP443, UDP53 = PortSpec(443, "tcp"), PortSpec(53, "udp")


def policy(default="deny", rules=(), search_domains=()):
    import json

    return policy_from_text(json.dumps({"defaultAction": default, "rules": list(rules),
                                        "searchDomains": list(search_domains)}), "test")


def host(value, action="allow", ports=None):
    rule = {"type": "hostname", "value": value, "action": action}
    if ports:
        rule["ports"] = [{"port": p, "protocol": proto} for p, proto in ports]
    return rule


# ------------------------------------------------------------------ endpoints


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", Endpoint("127.0.0.1", 53)),
    ("127.0.0.1:5353", Endpoint("127.0.0.1", 5353)),
    ("::1", Endpoint("::1", 53)),
    ("[::1]:5353", Endpoint("::1", 5353)),
    ("[fd00:0::1]", Endpoint("fd00::1", 53)),
    (" 10.0.0.1:53 ", Endpoint("10.0.0.1", 53)),
])
def test_endpoints_parse(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["dns.google", "1.2.3.4:0", "1.2.3.4:70000", "1.2.3.4:x",
                                  "[::1", "[::1]x", ""])
def test_bad_endpoints_say_why(text):
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_listen_addresses_refuse_wildcards_and_fold_duplicates():
    assert parse_listen("127.0.0.1:53, 127.0.0.1, 172.17.0.1") == (
        Endpoint("127.0.0.1", 53), Endpoint("172.17.0.1", 53))
    for text in ("0.0.0.0:53", "[::]:53", "", " , "):
        with pytest.raises(ValueError):
            parse_listen(text)


RESOLV = """# generated
search example.internal
nameserver 127.0.0.1
nameserver not-an-address
nameserver fe80::1%eth0
nameserver 10.0.0.2
options edns0
"""


def test_the_default_upstream_is_the_first_nameserver_that_is_not_the_proxy():
    assert nameservers(RESOLV) == ["127.0.0.1", "fe80::1", "10.0.0.2"]
    ours = parse_listen("127.0.0.1:53")
    assert default_upstream(RESOLV, ours) == Endpoint("fe80::1", 53)
    # Listening elsewhere, 127.0.0.1:53 is another resolver (systemd-resolved, dnsmasq).
    assert default_upstream(RESOLV, parse_listen("127.0.0.1:5353")) == Endpoint("127.0.0.1", 53)
    assert default_upstream("nameserver 127.0.0.1\n", ours) is None


def test_choose_upstream_prefers_the_setting_and_refuses_a_loop():
    ours = parse_listen("127.0.0.1:53")
    assert choose_upstream("9.9.9.9", RESOLV, ours) == Endpoint("9.9.9.9", 53)
    assert choose_upstream("", RESOLV, ours) == Endpoint("fe80::1", 53)
    with pytest.raises(ValueError, match="loop"):
        choose_upstream("127.0.0.1:53", RESOLV, ours)
    with pytest.raises(ValueError, match="resolv.conf"):
        choose_upstream("", "nameserver 127.0.0.1\n", ours)


STUB = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n"
RESOLVED = "# systemd-resolved's upstreams\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n"


@pytest.mark.parametrize("resolv, resolved, upstream", [
    (STUB, RESOLVED, "10.0.0.2"),                       # behind systemd-resolved's stub
    ("nameserver 127.0.0.54\n", RESOLVED, "10.0.0.2"),  # its other stub
    ("nameserver 127.0.0.53\nnameserver 9.9.9.9\n", RESOLVED, "10.0.0.2"),
    ("nameserver 127.0.0.2\nnameserver 9.9.9.9\n", RESOLVED, "9.9.9.9"),  # dnsmasq: skipped
    ("nameserver 9.9.9.9\n", "", "9.9.9.9"),
    (STUB, "nameserver 127.0.0.1\nnameserver ::1\nnameserver 10.0.0.9\n", "10.0.0.9"),
])
def test_with_the_redirect_the_upstream_is_never_a_resolver_on_this_host(resolv, resolved,
                                                                          upstream):
    ours = parse_listen("127.0.0.1:53")
    assert choose_upstream("", resolv, ours, redirect=True,
                           resolved_conf=resolved) == Endpoint(upstream, 53)
    if upstream == "10.0.0.2":  # without the redirect the stub itself is fine
        assert choose_upstream("", resolv, ours, resolved_conf=resolved).host.startswith("127.")


@pytest.mark.parametrize("setting, resolv, resolved, message", [
    ("127.0.0.53", STUB, RESOLVED, "127.0.0.53:53 is a resolver on this host.*a loop"),
    ("[::1]:53", STUB, RESOLVED, "a resolver on this host"),
    ("::ffff:127.0.0.2", STUB, RESOLVED, "a resolver on this host"),
    ("", STUB, "", "names only resolvers on this host.*no systemd-resolved"),
    ("", "nameserver 127.0.0.2\n", RESOLVED, "names only resolvers on this host"),
])
def test_with_the_redirect_a_loop_through_a_local_resolver_is_one_clear_line(setting, resolv,
                                                                             resolved, message):
    with pytest.raises(ValueError, match=message):
        choose_upstream(setting, resolv, parse_listen("127.0.0.1:53"), redirect=True,
                        resolved_conf=resolved)


# ------------------------------------------------------------------ queries as bytes


def wire(name="www.Example.test", rdtype="A", **kw) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()


def test_a_query_parses_to_its_question_and_udp_limit():
    query = packets.parse_query(wire(use_edns=0, payload=1232))
    assert (query.qname, query.name, query.qtype, query.qclass) == (
        "www.Example.test.", "www.example.test", 1, 1)
    assert query.udp_limit == 1232
    assert query.cache_key == b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
    assert packets.parse_query(wire()).udp_limit == 512
    assert packets.parse_query(wire(use_edns=0, payload=100)).udp_limit == 512


def test_odd_label_bytes_are_escaped_not_trusted():
    name = dns.name.Name([b"a.b", b"\x00x", b"test", b""])
    query = packets.parse_query(dns.message.make_query(name, "A").to_wire())
    assert query.qname == "a\\046b.\\000x.test."


def _with_count(data: bytes, index: int, value: int) -> bytes:
    return data[:4 + 2 * index] + value.to_bytes(2, "big") + data[6 + 2 * index:]


def _with_flags(data: bytes, flags: int) -> bytes:
    return data[:2] + flags.to_bytes(2, "big") + data[4:]


@pytest.mark.parametrize("data", [
    wire(),
    wire(use_edns=0, payload=1232),
    wire(use_edns=0, payload=100),
    wire("a.test", "AAAA", want_dnssec=True),
    wire(dns.name.Name([b"a.b", b"\x00x", b"test", b""])),   # odd bytes: still simple
    wire("."),
    wire("a.test", "TXT", rdclass="CH"),
])
def test_a_simple_query_gives_what_the_full_parse_gives(data):
    question, udp_limit = packets.simple_question(data)
    parsed = packets.parse_query(data)
    assert packets.known_query(data, question, parsed.qname, udp_limit) == parsed


def _with_tsig_like_record(data: bytes) -> bytes:
    record = b"\x00" + (250).to_bytes(2, "big") + b"\x00\xff" + b"\x00" * 4 + b"\x00\x00"
    return _with_count(data, 3, 1) + record


@pytest.mark.parametrize("data", [
    b"\x00" * 12,                                       # a header only
    b"\x00" * 5,
    _with_count(wire(), 0, 0),                           # no question
    _with_count(wire(), 0, 2),
    _with_flags(wire(), 0x8100),                         # a response
    _with_flags(wire(), 0x2100),                         # opcode 4 (NOTIFY)
    wire()[:12] + b"\xc0\x0c" + wire()[-4:],             # compressed name
    wire()[:-2],                                         # cut short
    wire() + b"\x00",                                   # trailing byte
    _with_tsig_like_record(wire()),                      # an additional record but OPT
    _with_count(wire(use_edns=0), 3, 2),                 # two additional records
    wire(use_edns=0)[:-1],                               # OPT cut short
    wire(use_edns=0) + b"\x00",
    wire(use_edns=0)[:-11] + b"\x01a" + wire(use_edns=0)[-10:],  # OPT not owned by root
    wire() + b"\x00" * 5000,                            # oversized
])
def test_anything_unusual_is_left_to_the_full_parse(data):
    assert packets.simple_question(data) is None


@pytest.mark.parametrize("data, why", [
    (b"\x00" * 5, "shorter than a DNS header"),
    (wire()[:-2], "question cut short"),
    (wire()[:14], "cut short"),
    (wire() + b"\x00", "bytes after the last record"),
    (wire() + b"\x00" * 5000, "oversized"),
    (_with_count(wire(), 0, 2), "more than one question"),
    (_with_count(wire(), 3, 1), "record name cut short"),
    (wire(use_edns=0)[:-3], "record cut short"),
    (dns.message.make_response(dns.message.make_query("x.test", "A")).to_wire(), "a response"),
    (wire()[:12] + b"\xc0\x0c" + wire()[-4:], "compressed"),
])
def test_malformed_queries_are_refused_with_a_reason(data, why):
    with pytest.raises(packets.Malformed, match=why):
        packets.parse_query(data)


def test_replies_echo_the_question_and_keep_rd():
    query = packets.parse_query(wire())
    refused = dns.message.from_wire(packets.reply(query, packets.REFUSED))
    assert refused.id == query.id and refused.rcode() == packets.REFUSED
    assert refused.flags & dns.flags.RD and refused.flags & dns.flags.QR
    assert refused.question[0].name.to_text() == "www.Example.test."


def test_an_answer_too_big_for_udp_becomes_a_truncated_question():
    query = packets.parse_query(wire())
    big = _answer("www.example.test.", [f"10.0.{i // 200}.{i % 200}" for i in range(100)])
    assert len(big) > 512
    small = dns.message.from_wire(packets.fit_for_udp(big, query))
    assert small.flags & dns.flags.TC and not small.answer and small.id == query.id
    roomy = packets.parse_query(wire(use_edns=0, payload=4096))
    assert packets.fit_for_udp(big, roomy) is big


def test_an_answer_matches_only_its_own_question():
    query = dns.message.make_query("www.example.test", "A")
    question = packets.parse_query(query.to_wire()).question
    answer = dns.message.make_response(query)
    good = answer.to_wire()
    assert packets.answers_question(good, query.id, question)
    upper = dns.message.make_response(dns.message.make_query("WWW.EXAMPLE.TEST", "A"))
    upper.id = query.id
    assert packets.answers_question(upper.to_wire(), query.id, question)  # 0x20 case
    assert not packets.answers_question(good, (query.id + 1) % 65536, question)
    assert not packets.answers_question(query.to_wire(), query.id, question)  # not a response
    other = dns.message.make_response(dns.message.make_query("www.example.test", "AAAA"))
    other.id = query.id
    assert not packets.answers_question(other.to_wire(), query.id, question)
    assert not packets.answers_question(good[:14], query.id, question)


# ------------------------------------------------------------------ answers


def _message(*rrsets) -> dns.message.Message:
    message = dns.message.make_response(dns.message.make_query("q.test", "A"))
    for owner, ttl, rdtype, values in rrsets:
        message.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", rdtype, values))
    return message


def _answer(owner, addresses, ttl=60) -> bytes:
    return _message((owner, ttl, "A", addresses)).to_wire()


def test_answer_facts_collect_addresses_ttls_and_cnames():
    facts = answer_facts(_message(
        ("Q.test.", 600, "CNAME", ["Hop.test."]), ("hop.test.", 30, "CNAME", ["edge.test."]),
        ("edge.test.", 120, "A", ["10.0.0.1", "10.0.0.2"]),
        ("edge.test.", 0, "AAAA", ["fd00::1", "::ffff:10.0.0.9"]),
        ("other.test.", 60, "A", ["10.0.0.1"])))
    assert facts.ips == ("10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.9")
    assert (facts.ttl, facts.smallest_positive_ttl, facts.answer_records) == (0, 30, 7)
    assert facts.cnames == (CnameRecord("q.test", "hop.test", 600),
                            CnameRecord("hop.test", "edge.test", 30))
    empty = answer_facts(_message())
    assert (empty.ttl, empty.ips, empty.cacheable) == (86_400, (), False)


# ------------------------------------------------------------------ filter


@pytest.mark.parametrize("name, canonical", [
    ("4.3.2.1.in-addr.arpa", True),
    ("0.0.0.0.in-addr.arpa", True),
    ("255.255.255.255.in-addr.arpa", True),
    ("256.3.2.1.in-addr.arpa", False),
    ("04.3.2.1.in-addr.arpa", False),
    ("+4.3.2.1.in-addr.arpa", False),
    ("3.2.1.in-addr.arpa", False),
    ("5.4.3.2.1.in-addr.arpa", False),
    ("x.4.3.2.1.in-addr.arpa", False),
    ("4.3.2.1.in-addr.arpa.evil.test", False),
    ("in-addr.arpa", False),
    (".".join("0123456789abcdef" * 2) + ".ip6.arpa", True),
    (".".join("0123456789abcdef" * 2)[2:] + ".ip6.arpa", False),   # 31 nibbles
    (".".join("0123456789abcdeg" * 2) + ".ip6.arpa", False),
    ("00." + ".".join("0123456789abcdef" * 2)[2:] + ".ip6.arpa", False),
])
def test_canonical_reverse_names(name, canonical):
    assert is_canonical_reverse_name(name) is canonical


FILTER_RULES = [host("allowed.test"), host("denied.test", "deny"),
                host("mixed.test", ports=[(443, "tcp")]),
                host("www.mixed.test.corp.example", "deny", [(80, "tcp")]),
                host("*.glob.test", "deny")]
FILTER_POLICY = policy(rules=FILTER_RULES, search_domains=["corp.example"])


@pytest.mark.parametrize("name, qtype, reason", [
    ("4.3.2.1.in-addr.arpa", 12, PTR),                  # canonical PTR before everything
    ("4.3.2.1.in-addr.arpa", 1, REFUSE),                # ... only for qtype PTR
    ("secret.in-addr.arpa", 12, REFUSE),
    ("www.allowed.test", 1, RULE),
    ("www.denied.test", 1, REFUSE),
    ("learned.cdn.test", 1, LEARNED),
    ("x.glob.test", 1, REFUSE),                         # a deny glob beats the learned target
    ("host.corp.example", 1, SEARCH_DOMAIN),
    ("host.denied.test.corp.example", 1, REFUSE),       # explicit deny beats the bypass
    ("host.default.svc.cluster.local", 1, REFUSE),      # Kubernetes suffixes never bypass
    ("www.mixed.test.corp.example", 1, RULE),           # deny 80 + allow 443: mixed
    ("unknown.test", 1, REFUSE),
])
def test_the_query_filter_in_the_reference_order(name, qtype, reason):
    learned = LearnedTargets()
    learned.learn((), ["allowed.test"], 0, [Hop("learned.cdn.test", 60), Hop("x.glob.test", 60)],
                  now=0)
    assert judge_query(FILTER_POLICY, learned, name, qtype, now=1) == reason


def test_default_allow_lets_unmatched_names_through_but_not_denied_ones():
    open_policy = policy("allow", [host("denied.test", "deny")])
    assert judge_query(open_policy, LearnedTargets(), "any.test", 1, 0) == DEFAULT_ALLOW
    assert judge_query(open_policy, LearnedTargets(), "a.denied.test", 1, 0) == REFUSE


@pytest.mark.parametrize("name, default, passes", [
    ("www.allowed.test", "deny", True),
    ("www.mixed.test.corp.example", "deny", True),
    ("host.corp.example", "deny", True),
    ("www.denied.test", "deny", False),
    ("host.denied.test.corp.example", "deny", False),
    ("x.glob.test", "allow", False),
    ("learned.cdn.test", "deny", False),       # only a learned target could let it by
    ("4.3.2.1.in-addr.arpa", "deny", False),   # only the PTR exemption could
    ("unknown.test", "deny", False),
    ("unknown.test", "allow", True),
])
def test_passing_by_policy_alone_never_lets_by_what_judge_query_refuses(name, default, passes):
    rules = policy(default, FILTER_RULES, ["corp.example"])
    assert passes_by_policy(rules, name) is passes
    for qtype in (1, 12, 28):
        for learned in (LearnedTargets(), _learned("learned.cdn.test", "x.glob.test")):
            refused = judge_query(rules, learned, name, qtype, now=1) == REFUSE
            assert not (passes and refused)


def _learned(*targets: str) -> LearnedTargets:
    learned = LearnedTargets()
    learned.learn((), ["allowed.test"], 0, [Hop(t, 60) for t in targets], now=0)
    return learned


def test_the_policy_memory_holds_verdicts_for_one_policy_object_in_bounded_memory():
    memory = PolicyMemory(capacity=2)
    strict, lenient = policy("deny", [host("a.test")]), policy("allow")
    verdict, passes = memory.of(strict, "a.test")
    assert verdict == strict.match_hostname("a.test") and verdict.has_allow and passes
    assert memory.of(lenient, "a.test") == (lenient.match_hostname("a.test"), True)
    assert not memory.of(strict, "b.test")[1]    # a new policy object: judged again
    memory.of(strict, "c.test")
    memory.of(strict, "d.test")
    assert list(memory.names) == ["c.test", "d.test"]


# ------------------------------------------------------------------ cache


@pytest.mark.parametrize("smallest_positive, seconds", [(0, 300), (1, 1), (60, 60), (300, 300),
                                                        (86_400, 300)])
def test_cache_lifetime(smallest_positive, seconds):
    assert lifetime(smallest_positive) == seconds


def _facts(rcode=0, records=1, smallest=60) -> AnswerFacts:
    return AnswerFacts(rcode, ("10.0.0.1",), smallest, smallest, (), records)


@pytest.mark.parametrize("first, second, same", [
    (wire("WWW.Example.TEST", "A"), wire("www.example.test", "A"), True),
    (wire("a.test", "A"), wire("a.test", "AAAA"), False),
    (wire("a.test", "TXT"), wire("a.test", "TXT", rdclass="CH"), False),
    (wire("a.test", "TYPE65"), wire("a.test", "TYPE97"), False),   # 0x41 is not 'A' there
    (wire("a.test", "A", use_edns=0), wire("A.test", "A"), True),  # EDNS is not in the key
    (wire(dns.name.Name([b"\xc1", b"test", b""])), wire(dns.name.Name([b"\xe1", b"test", b""])),
     False),                                                       # only ASCII letters fold
])
def test_cache_keys_fold_the_name_case_only(first, second, same):
    keys = [packets.parse_query(data).cache_key for data in (first, second)]
    assert (keys[0] == keys[1]) is same
    assert keys[0] == packets.question_key(packets.simple_question(first)[0])


def test_the_cache_keeps_noerror_answers_with_records_until_they_expire():
    cache = ResponseCache(capacity=2)
    assert cache.store(b"a", "A.", b"a", _facts(), now=0)
    assert not cache.store(b"b", "b.", b"b", _facts(rcode=3), now=0)     # NXDOMAIN
    assert not cache.store(b"c", "c.", b"c", _facts(records=0), now=0)   # NODATA
    assert not cache.store(b"", ".", b"d", _facts(), now=0)              # no question
    assert (cache.live(b"a", now=59.9).wire, cache.live(b"a", now=59.9).qname) == (b"a", "A.")
    assert cache.live(b"a", now=60) is None and len(cache) == 0         # lazy expiry
    cache.store(b"zero", "zero.", b"z", _facts(smallest=0), now=0)
    assert cache.live(b"zero", now=MAX_LIFETIME - 1) is not None


def test_the_cache_evicts_the_least_recently_used():
    cache = ResponseCache(capacity=2)
    cache.store(b"a", "a.", b"a", _facts(), 0)
    cache.store(b"b", "b.", b"b", _facts(), 0)
    cache.live(b"a", 1)
    cache.store(b"c", "c.", b"c", _facts(), 1)
    assert cache.live(b"b", 1) is None and cache.live(b"a", 1) and cache.live(b"c", 1)


# ------------------------------------------------------------------ confirmed open


A, B, C = "10.0.0.1", "10.0.0.2", "fd00::1"


@pytest.mark.parametrize("confirmations, asked, expected", [
    ([("n", [A, B], 1)], ("n", [A, B], 1), True),
    ([("n", [A, B], 1)], ("n", [B], 1), True),          # fewer addresses
    ([("n", [A], 1)], ("n", [A, C], 1), False),         # another address
    ([("n", [A], 1)], ("m", [A], 1), False),            # another name
    ([("n", [A], 1), ("n", [C], 1)], ("n", [A, C], 1), True),
    ([("n", [A], 1)], ("n", [A], 2), False),            # the maps moved on
    ([("n", [A], None)], ("n", [A], None), False),      # no generation: never
    ([("n", [A], (7, 1))], ("n", [A], (7, 1)), True),   # any comparable token will do
    ([("n", [A], (7, 1))], ("n", [A], (8, 1)), False),
])
def test_an_answer_is_open_when_all_its_pairs_were_confirmed_at_this_generation(
        confirmations, asked, expected):
    memory = ConfirmedOpen()
    for name, ips, generation in confirmations:
        memory.covers(name, ips, generation)   # what the stage checks before asking
        memory.confirm(name, ips, generation)
    assert memory.covers(*asked) is expected


def test_a_generation_change_forgets_everything_even_a_return_to_the_old_one():
    memory = ConfirmedOpen()
    memory.covers("n", [A], 1)
    memory.confirm("n", [A], 1)
    assert not memory.covers("n", [A], 2) and len(memory) == 0
    assert not memory.covers("n", [A], 1)
    memory.covers("n", [A], None)
    assert len(memory) == 0


def test_a_confirmation_of_a_request_sent_before_the_maps_moved_on_is_dropped():
    memory = ConfirmedOpen()
    memory.covers("n", [A], 1)      # asked at 1 ...
    memory.covers("m", [B], 2)      # ... another answer meanwhile sees 2
    memory.confirm("n", [A], 1)     # the ok of the request sent at 1
    assert not memory.covers("n", [A], 2) and len(memory) == 0


def test_confirmed_pairs_are_a_bounded_lru():
    memory = ConfirmedOpen(capacity=3)
    memory.covers("n", [], 1)
    memory.confirm("n", [A, B], 1)
    memory.confirm("m", [A], 1)
    assert memory.covers("n", [A], 1)            # touches (n, A)
    memory.confirm("m", [C], 1)                  # evicts (n, B), the least recently used
    assert len(memory) == 3 and not memory.covers("n", [B], 1)
    assert memory.covers("n", [A], 1) and memory.covers("m", [A, C], 1)


# ------------------------------------------------------------------ CNAME chains


def cname(owner, target, ttl=60):
    return CnameRecord(owner, target, ttl)


@pytest.mark.parametrize("records, hops", [
    ([], []),
    ([cname("q", "a", 10), cname("a", "b", 20)], [Hop("a", 10), Hop("b", 20)]),
    ([cname("a", "b"), cname("q", "a")], [Hop("a", 60), Hop("b", 60)]),      # any order
    ([cname("q", "a", 1), cname("q", "x", 2)], [Hop("a", 1)]),               # first wins
    ([cname("q", "a"), cname("a", "q")], [Hop("a", 60)]),                    # loop ends
    ([cname("q", "a"), cname("a", "a")], [Hop("a", 60)]),
    ([cname("other", "a"), cname("a", "b")], []),                            # not connected
])
def test_the_chain_walk(records, hops):
    assert walk_chain("q", records) == hops


@pytest.mark.parametrize("ttl, reach", [(0, 300), (1, 30), (29, 30), (30, 30), (31, 31),
                                        (3600, 3600)])
def test_effective_ttl(ttl, reach):
    assert effective_ttl(ttl) == reach


def test_learning_takes_the_running_max_of_floored_hop_ttls_capped_at_a_day():
    learned = LearnedTargets()
    learned.learn((TCP443,), ["origin"], 0, [Hop("a", 5), Hop("b", 0), Hop("c", 100),
                                             Hop("d", 10**6), Hop("e", 1)], now=1000)
    lives = {name: learned.entries[name].expires - 1000 for name in "abcde"}
    assert lives == {"a": 30, "b": 300, "c": 300, "d": MAX_REACH, "e": MAX_REACH}
    assert learned.entries["c"].chain == ("origin", "a", "b", "c")
    assert learned.entries["c"].ports == (TCP443,)


def test_a_relearned_target_merges_ports_takes_the_new_chain_and_only_lives_longer():
    learned = LearnedTargets()
    learned.learn((TCP443,), ["one"], 0, [Hop("t", 600)], now=0)
    learned.learn((UDP53,), ["two"], 0, [Hop("t", 30)], now=100)
    entry = learned.entries["t"]
    assert entry.ports == (TCP443, UDP53) and entry.chain == ("two", "t")
    assert entry.expires == 600
    learned.learn((), ["three"], 0, [Hop("t", 30)], now=200)
    assert learned.entries["t"].ports == ()   # all ports absorbs any list
    learned.learn((TCP443,), ["four"], 0, [Hop("t", 30)], now=700)  # expired: replaced
    assert learned.entries["t"].ports == (TCP443,) and learned.entries["t"].expires == 730


def test_derived_reach_is_the_remaining_life_capped_at_a_day():
    learned = LearnedTargets()
    learned.learn((TCP443,), ["o"], 0, [Hop("t", 100)], now=0)
    derived = learned.derive("t", now=40)
    assert (derived.ports, derived.chain, derived.reach) == ((TCP443,), ("o", "t"), 60)
    assert learned.derive("t", now=100) is None and learned.derive("x", 0) is None


def test_learned_targets_are_bounded():
    learned = LearnedTargets(capacity=3)
    learned.learn((), ["o"], 0, [Hop(f"t{i}", 60) for i in range(5)], now=0)
    assert list(learned.entries) == ["t2", "t3", "t4"]


# ------------------------------------------------------------------ enforcement plans


PLAN_POLICY = policy(rules=[host("allowed.test", ports=[(443, "tcp")]),
                            host("denied.test", "deny"),
                            host("both.test", ports=[(443, "tcp")]),
                            host("both.test.corp.example", "deny")],
                     search_domains=["corp.example"])


def facts(ips=(), cnames=(), ttl=60) -> AnswerFacts:
    return AnswerFacts(0, tuple(ips), ttl, ttl, tuple(cnames), len(ips) + len(cnames))


def test_an_allowed_answer_asks_for_its_addresses_and_maps_them():
    plan = plan_answer(PLAN_POLICY, LearnedTargets(), "www.allowed.test", facts(["10.0.0.1"]), 0)
    assert plan.ask == AllowAsk("www.allowed.test", ())
    assert plan.mapping_chain == () and plan.pre_resolve == ""
    remembered = PLAN_POLICY.match_hostname("www.allowed.test")
    assert plan_answer(PLAN_POLICY, LearnedTargets(), "www.allowed.test", facts(["10.0.0.1"]), 0,
                       verdict=remembered) == plan


def test_an_allowed_chain_teaches_its_targets_and_carries_the_chain():
    learned = LearnedTargets()
    answer = facts(["10.0.0.1"], [cname("www.allowed.test", "hop.test", 600),
                                  cname("hop.test", "edge.cdn", 20)])
    plan = plan_answer(PLAN_POLICY, learned, "www.allowed.test", answer, now=0)
    chain = ("www.allowed.test", "hop.test", "edge.cdn")
    assert plan.ask == AllowAsk("www.allowed.test", chain) and plan.mapping_chain == chain
    assert learned.entries["edge.cdn"].ports == (TCP443,)
    assert learned.entries["edge.cdn"].expires == 600   # the running max, not the last hop


def test_a_derived_answer_asks_under_the_chains_origin_and_extends_it():
    learned = LearnedTargets()
    learned.learn((TCP443,), ["www.allowed.test"], 0, [Hop("edge.cdn", 100)], now=0)
    answer = facts(["10.0.1.1"], [cname("edge.cdn", "node.cdn", 10)])
    plan = plan_answer(PLAN_POLICY, learned, "edge.cdn", answer, now=50)
    chain = ("www.allowed.test", "edge.cdn", "node.cdn")
    assert plan.ask == AllowAsk("www.allowed.test", chain) and plan.mapping_chain == chain
    assert learned.entries["node.cdn"].expires == 50 + 50   # seeded by the parent's 50 s left


def test_a_denied_name_neither_derives_nor_learns_but_its_deny_side_is_written():
    learned = LearnedTargets()
    learned.learn((), ["www.allowed.test"], 0, [Hop("x.denied.test", 100)], now=0)
    answer = facts(["10.0.0.9"], [cname("x.denied.test", "y.cdn", 60)])
    plan = plan_answer(PLAN_POLICY, learned, "x.denied.test", answer, now=1)
    assert plan.ask == AllowAsk("x.denied.test", ("x.denied.test", "y.cdn"))
    assert "y.cdn" not in learned.entries


def test_an_unmatched_name_is_only_mapped_and_a_search_domain_name_not_even_that():
    plan = plan_answer(PLAN_POLICY, LearnedTargets(), "free.test", facts(["10.0.0.1"]), 0)
    assert plan.ask is None and plan.mapping_chain == ()
    bypass = plan_answer(PLAN_POLICY, LearnedTargets(), "h.corp.example", facts(["10.0.0.1"]), 0)
    assert bypass.ask is None and bypass.mapping_chain is None


def test_a_mixed_verdict_from_search_domain_stripping_asks_for_both_sides():
    plan = plan_answer(PLAN_POLICY, LearnedTargets(), "both.test.corp.example",
                       facts(["10.0.0.1"]), 0)
    assert plan.ask == AllowAsk("both.test.corp.example", ())


@pytest.mark.parametrize("name, depth, target", [
    ("www.allowed.test", 0, "far.cdn"),
    ("www.allowed.test", 1, "far.cdn"),
    ("www.allowed.test", 2, ""),            # depth bound
    ("free.test", 0, ""),                   # not allowed: nothing to open ahead
    ("x.denied.test", 0, ""),
])
def test_an_answer_that_stops_at_a_cname_pre_resolves_its_target(name, depth, target):
    answer = facts([], [cname(name, "mid.cdn", 60), cname("mid.cdn", "far.cdn", 60)])
    plan = plan_answer(PLAN_POLICY, LearnedTargets(), name, answer, 0, depth)
    assert (plan.ask, plan.mapping_chain, plan.pre_resolve) == (None, None, target)


def test_pre_resolution_happens_once_per_target_per_interval_in_bounded_memory():
    memory = PreResolveMemory(capacity=2, interval=30)
    assert memory.claim("a", 0) and not memory.claim("a", 29.9) and memory.claim("a", 30)
    memory.claim("b", 31)
    memory.claim("c", 32)
    assert list(memory.last) == ["b", "c"]


# ------------------------------------------------------------------ who holds a port


UDP_TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1111 2 0 0
  2: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2222 2 0 0
  3: 0200007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3333 2 0 0
"""  # noqa: E501 - /proc/net/udp as the kernel writes it
TCP6_TABLE = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:0035 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 5555 1 0 100 0 0 10 0
"""  # noqa: E501 - /proc/net/tcp6 as the kernel writes it


@pytest.mark.parametrize("table, host_, port, tcp, inodes", [
    (UDP_TABLE, "127.0.0.1", 53, False, [1111]),
    (UDP_TABLE, "127.0.0.2", 53, False, [3333]),
    (UDP_TABLE, "10.0.0.1", 5353, False, [2222]),      # a wildcard holds every address
    (UDP_TABLE, "127.0.0.1", 54, False, []),
    (TCP6_TABLE, "::1", 53, True, [4444]),             # only listening sockets count
    (TCP6_TABLE, "127.0.0.1", 53, True, [4444]),       # a dual-stack [::] holds IPv4 too
])
def test_holders_are_read_from_proc_net(table, host_, port, tcp, inodes):
    assert holder_inodes(table, host_, port, tcp) == inodes
