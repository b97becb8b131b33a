"""The gate's pure parts: the expected-blocks file, matching, GitHub annotations."""

import pytest

from pipeline.report.data import Blocked, Refused
from pipeline.report.gate import (MAX_BYTES, Expected, ExpectedError, Finding, annotation,
                                  parse_expected, read_expected, unexpected)


@pytest.mark.parametrize("line, name, port", [
    ("evil.example:443", "evil.example", 443),
    ("  Evil.Example.:443   # trailing comment", "evil.example", 443),
    ("*.tracker.example:*", "*.tracker.example", None),
    ("10.0.0.*:8080", "10.0.0.*", 8080),
    ("[2001:db8::1]:443", "2001:db8::1", 443),
    ("198.51.100.8:0", "198.51.100.8", 0),
])
def test_good_lines(line, name, port):
    assert parse_expected(line, "f") == [Expected(name, port, 1)]


@pytest.mark.parametrize("line, problem", [
    ("evil.example", "f:1: expected name:port or address:port"),
    ("evil.example:https", "f:1: port 'https' is not a number from 0 to 65535 or *"),
    ("evil.example:70000", "f:1: port '70000' is not a number"),
    (":443", "f:1: no name or address before the port"),
    ("2001:db8::1:443", "f:1: an IPv6 address is written [address]:port"),
    ("[2001:db8::1]443", "f:1: an IPv6 address is written [address]:port"),
    ("a.example:443 b.example:443", "f:1: one destination per line"),
    ("x" * 1001, "f:1: line longer than 1000 characters"),
])
def test_bad_lines_name_the_line(line, problem):
    with pytest.raises(ExpectedError) as err:
        parse_expected(line, "f")
    assert str(err.value).startswith(problem)


def test_comments_and_blank_lines_are_skipped_and_lines_are_numbered():
    entries = parse_expected("# header\n\nok.example:1\n", "list.txt")
    assert entries == [Expected("ok.example", 1, 3)]
    with pytest.raises(ExpectedError, match="^list.txt:5: expected name:port"):
        parse_expected("# header\n\nok.example:1\n   \nbad\n", "list.txt")


def test_the_file_is_read_with_limits(tmp_path):
    with pytest.raises(ExpectedError, match="No such file"):
        read_expected(tmp_path / "missing")
    big = tmp_path / "big"
    big.write_bytes(b"a.example:1\n" * (MAX_BYTES // 12 + 2))
    with pytest.raises(ExpectedError, match="larger than"):
        read_expected(big)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ExpectedError, match="not UTF-8"):
        read_expected(binary)
    many = tmp_path / "many"
    many.write_text("".join(f"h{i}.example:1\n" for i in range(10_001)))
    with pytest.raises(ExpectedError, match="more than 10000"):
        read_expected(many)


def blocked(destination, port, protocol="TCP"):
    return Blocked(destination, port, protocol, 2, "t1", "t2", ("curl",))


def test_unexpected_blocks():
    entries = parse_expected("*.ads.example:443\n10.0.0.1:*\n[2001:db8::1]:53\n"
                             "known.example:443\n", "f")
    findings = unexpected(
        [blocked("a.ads.example", 443), blocked("a.ads.example", 80), blocked("10.0.0.1", 9),
         blocked("2001:db8::1", 53, "UDP"), blocked("ads.example", 443)],
        [Refused("known.example", 1, "t1", "t1"), Refused("other.example", 3, "t1", "t2")],
        entries, "blocked")
    assert [f.key for f in findings] == ["a.ads.example:80", "ads.example:443", "other.example"]
    assert findings[0].message == "a.ads.example:80 (TCP) blocked 2 time(s) by curl, first at t1"
    assert findings[2].message == "DNS query for other.example refused 3 time(s), first at t1"


def test_annotations_escape_what_github_would_read_as_syntax():
    line = annotation(Finding("[2001:db8::1]:443", "50% of\nit, really: yes"))
    assert line == ("::error title=sluice%3A unexpected block of [2001%3Adb8%3A%3A1]%3A443::"
                    "50%25 of%0Ait, really: yes (not in the expected-blocks file)")
