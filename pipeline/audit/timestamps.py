"""Audit timestamps as text: the JSONL form, the fixed-width SQL form, and parsing them back.

Kept apart from records.py so that `sluice query` and `sluice prune` import only
this to read a --since, --until or --before.
"""

from __future__ import annotations

import datetime
import re
import time

from ..errors import ExitCode, SluiceError

_NS = 1_000_000_000
_SECONDS: dict[int, str] = {}  # records come in bursts within a second: format each once


class TimeError(SluiceError):
    """A time on the command line that is not one; the message names the option."""

    exit_code = ExitCode.BAD_INPUT


def _second_text(seconds: int) -> str:
    if len(_SECONDS) >= 4096:
        _SECONDS.clear()
    t = time.gmtime(seconds)
    text = _SECONDS[seconds] = (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
                                f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
    return text


def format_timestamp(ns: int) -> str:
    """RFC 3339 UTC with nanoseconds, trailing fractional zeros trimmed (Go's RFC3339Nano)."""
    seconds, fraction = divmod(ns, _NS)
    text = _SECONDS.get(seconds) or _second_text(seconds)
    if not fraction:
        return text + "Z"
    # The fraction is non-zero, so the strip stops at one of its digits.
    return f"{text}.{fraction:09d}".rstrip("0") + "Z"


def sql_timestamp(ns: int) -> str:
    """Fixed width, 9 fractional digits: sorts as text in SQLite and PostgreSQL."""
    seconds, fraction = divmod(ns, _NS)
    return f"{_SECONDS.get(seconds) or _second_text(seconds)}.{fraction:09d}Z"


_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:[Zz]|([+-])(\d\d):(\d\d))")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def parse_timestamp(text: str) -> int:
    """RFC 3339 with any offset and 0-9 fractional digits -> UTC nanoseconds."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r:.60}")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    offset = datetime.timedelta(0)
    if sign:
        offset = datetime.timedelta(hours=int(off_h), minutes=int(off_m))
        offset = -offset if sign == "-" else offset
    try:
        moment = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute),
                                   int(second), tzinfo=datetime.timezone(offset))
    except ValueError as err:
        raise ValueError(f"bad RFC 3339 timestamp {text!r:.60}: {err}") from None
    delta = moment - _EPOCH
    return (delta.days * 86400 + delta.seconds) * _NS + int((fraction or "0").ljust(9, "0"))


_AGE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_moment(text: str, option: str, now_ns: int | None = None) -> int:
    """An RFC 3339 time, a date (UTC midnight) or, when now_ns is given, an age such as 90m,
    24h or 7d before it -> UTC nanoseconds; TimeError naming the option otherwise."""
    text = text.strip()
    age = _AGE.fullmatch(text)
    if age and now_ns is not None:
        return now_ns - int(age.group(1)) * _UNITS[age.group(2)] * _NS
    try:
        if re.fullmatch(r"\d{4}-\d\d-\d\d", text):
            return parse_timestamp(text + "T00:00:00Z")
        return parse_timestamp(text)
    except ValueError:
        forms = ("an RFC 3339 time or an age such as 24h or 7d, or a date"
                 if now_ns is not None else "an RFC 3339 time or a date")
        raise TimeError(f"{option} {text!r}: use {forms}") from None
