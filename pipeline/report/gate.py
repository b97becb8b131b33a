"""The gate: which blocks a run did not expect, and how CI is told.

The expected-blocks file lists one destination per line as the report prints them:
`name:port` or `address:port` (`[2001:db8::1]:443` for IPv6), `*` in the name matching any
run of characters (`*.tracker.example:443`), `*` as the port matching every port, `#`
starting a comment. A protocol block (GRE and the like) has port 0. A refused DNS name has no
port: any line whose name matches it covers it.

The file is read with limits (size, lines, line length) and any problem is one line naming
the file and the line; nothing is half-read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import ExitCode, SluiceError
from .data import Blocked, Refused

MAX_BYTES = 1 << 20
MAX_ENTRIES = 10_000
MAX_LINE = 1_000


class ExpectedError(SluiceError):
    exit_code = ExitCode.BAD_INPUT


class GateFailed(SluiceError):
    exit_code = ExitCode.UNEXPECTED_BLOCK


@dataclasses.dataclass(frozen=True)
class Expected:
    name: str              # lowercased, may hold `*`
    port: int | None       # None = any port
    line: int

    def matches(self, name: str, port: int | None) -> bool:
        return (glob_matches(self.name, name.lower())
                and (self.port is None or port is None or self.port == port))


def glob_matches(pattern: str, text: str) -> bool:
    """`*` matches any run of characters. Linear in the text: each piece between stars is
    found leftmost in turn (a regular expression of many `.*` backtracks exponentially on a
    name that does not match, and the file is someone's input)."""
    if "*" not in pattern:
        return pattern == text
    first, *middle, last = pattern.split("*")
    if len(text) < len(first) + len(last) or not (text.startswith(first)
                                                  and text.endswith(last)):
        return False
    pos, end = len(first), len(text) - len(last)
    for piece in middle:
        found = text.find(piece, pos, end)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


def parse_expected(text: str, source: str) -> list[Expected]:
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        if len(raw) > MAX_LINE:
            raise ExpectedError(f"{source}:{number}: line longer than {MAX_LINE} characters")
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        entries.append(_entry(line, source, number))
        if len(entries) > MAX_ENTRIES:
            raise ExpectedError(f"{source}:{number}: more than {MAX_ENTRIES} destinations")
    return entries


def _entry(line: str, source: str, number: int) -> Expected:
    where = f"{source}:{number}"
    if any(c.isspace() for c in line):
        raise ExpectedError(f"{where}: one destination per line, found {line!r:.80}")
    if line.startswith("["):
        name, bracket, rest = line[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ExpectedError(f"{where}: an IPv6 address is written [address]:port, "
                                f"found {line!r:.80}")
        port_text = rest[1:]
    else:
        name, colon, port_text = line.rpartition(":")
        if not colon:
            raise ExpectedError(f"{where}: expected name:port or address:port (the port may "
                                f"be *), found {line!r:.80}")
        if ":" in name:
            raise ExpectedError(f"{where}: an IPv6 address is written [address]:port, "
                                f"found {line!r:.80}")
    if not name:
        raise ExpectedError(f"{where}: no name or address before the port in {line!r:.80}")
    return Expected(name.lower().rstrip("."), _port(port_text, where), number)


def _port(text: str, where: str) -> int | None:
    if text == "*":
        return None
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ExpectedError(f"{where}: port {text!r:.20} is not a number from 0 to 65535 or *")
    return int(text)


def read_expected(path: Path) -> list[Expected]:
    """The entries of an expected-blocks file; ExpectedError (one line) when it is missing,
    too large, not text or malformed."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as err:
        raise ExpectedError(f"expected-blocks file {path}: {err.strerror}") from None
    if len(data) > MAX_BYTES:
        raise ExpectedError(f"expected-blocks file {path}: larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ExpectedError(f"expected-blocks file {path}: not UTF-8 text") from None
    return parse_expected(text, str(path))


@dataclasses.dataclass(frozen=True)
class Finding:
    """A block nobody expected."""

    key: str
    message: str


def unexpected(blocked: list[Blocked], refused: list[Refused], expected: list[Expected],
               blocked_word: str) -> list[Finding]:
    findings = []
    for b in blocked:
        if not any(e.matches(b.destination, b.port) for e in expected):
            who = f" by {', '.join(b.processes)}" if b.processes else ""
            findings.append(Finding(b.key, f"{b.key} ({b.protocol}) {blocked_word} "
                                    f"{b.attempts} time(s){who}, first at {b.first_seen}"))
    for r in refused:
        if not any(e.matches(r.name, None) for e in expected):
            findings.append(Finding(r.name, f"DNS query for {r.name} refused {r.attempts} "
                                    f"time(s), first at {r.first_seen}"))
    return findings


def _data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _property(text: str) -> str:
    return _data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(finding: Finding) -> str:
    """A GitHub Actions error annotation (workflow command) for one finding."""
    return (f"::error title={_property('sluice: unexpected block of ' + finding.key)}::"
            f"{_data(finding.message + ' (not in the expected-blocks file)')}")
