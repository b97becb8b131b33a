"""Read-only SQL over the audit store (`sluice query`) and its output formats.

Two locks keep a query from changing the store: only one SELECT (or WITH ... SELECT, or
VALUES) statement is accepted, and it runs on a read-only connection (SQLite opened
mode=ro with query_only; PostgreSQL in a read-only session), so whatever the first check
misses the database itself refuses.

A query imports only its database's driver (sqlite3, or psycopg for PostgreSQL), not the
writer's SQLAlchemy: `sluice query` over a rollup view answers in a fraction of a second,
start-up included (benchmarks/query_views.py). `:since` and `:until` in the SQL are bound to
the fixed-width text of --since/--until, which compares with `timestamp` columns.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import json
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TextIO

from ..errors import StoreError

READING_KEYWORDS = ("select", "with", "values")
# What may hide a semicolon, a keyword or a parameter: string literals, quoted names, comments.
_NOT_CODE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.S)
_PARAMETER = re.compile(r"(?<![:\w]):(since|until)\b")


class QueryError(StoreError):
    """A query that was refused or failed; the message is one line."""


def check_read_only(sql: str) -> None:
    """QueryError unless sql is a single reading statement."""
    code = _NOT_CODE.sub(" ", sql).strip()
    if ";" in code.rstrip("; \t\n"):
        raise QueryError("one statement at a time: sluice query runs a single SELECT")
    first = re.match(r"[A-Za-z_]+", code)
    keyword = first.group().lower() if first else ""
    if keyword not in READING_KEYWORDS:
        shown = keyword.upper() or "an empty statement"
        raise QueryError(f"refused {shown}: sluice query is read-only and runs only SELECT "
                         "(WITH ... SELECT, VALUES) statements; nothing was changed")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def shown_url(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


# ---------------------------------------------------------------- read-only connections

class Connection(NamedTuple):
    conn: Any                 # a DB-API connection that refuses writes
    error: type[Exception]    # its driver's error class
    postgresql: bool


def _sqlite(url: str, rest: str) -> Connection:
    import sqlite3

    path = urllib.parse.unquote(rest.split("?", 1)[0])
    if path in ("", ":memory:"):
        target, uri = ":memory:", False
    else:
        # mode=ro: the driver itself refuses writes, and a missing file is an error.
        target, uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro", True
    try:
        conn = sqlite3.connect(target, uri=uri, isolation_level=None)
        conn.execute("PRAGMA query_only=ON")  # also refuses writes to attached files
        conn.execute("PRAGMA busy_timeout=1000")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # finds a non-database
    except sqlite3.Error as err:
        raise QueryError(f"cannot open {shown_url(url)}: {_one_line(err)}") from None
    return Connection(conn, sqlite3.Error, False)


def _postgresql(url: str, rest: str) -> Connection:
    import psycopg

    try:
        conn = psycopg.connect("postgresql://" + rest, connect_timeout=10)
        with conn.cursor() as cursor:
            # Read-only for the whole session, not only the transaction: a statement that
            # commits and goes on ("...; COMMIT; DELETE ...") stays read-only. JIT compiling
            # would take longer than the views' queries (benchmarks/query_views.py).
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            cursor.execute("SET jit = off")
        conn.commit()
    except psycopg.Error as err:
        raise QueryError(f"cannot open {shown_url(url)}: {_one_line(err)}") from None
    return Connection(conn, psycopg.Error, True)


def connect_readonly(url: str) -> Connection:
    """A read-only connection to the store at url (a SQLAlchemy-style URL)."""
    scheme, sep, rest = url.partition("://")
    backend = scheme.split("+", 1)[0]
    if not sep:
        raise QueryError(f"not a database URL: {url!r}")
    if backend == "sqlite":
        return _sqlite(url, rest.removeprefix("/"))
    if backend in ("postgresql", "postgres"):
        return _postgresql(url, rest)
    raise QueryError(f"{shown_url(url)}: unsupported database {backend!r} (use sqlite or "
                     "postgresql)")


def _bind(sql: str, postgresql: bool, params: dict[str, str]) -> str:
    """The statement in the driver's parameter style (psycopg: %(name)s, % doubled)."""
    if not postgresql or not params:
        return sql
    out, last = [], 0
    for literal in _NOT_CODE.finditer(sql):
        code = sql[last:literal.start()].replace("%", "%%")
        out += [_PARAMETER.sub(r"%(\1)s", code), literal.group().replace("%", "%%")]
        last = literal.end()
    out.append(_PARAMETER.sub(r"%(\1)s", sql[last:].replace("%", "%%")))
    return "".join(out)


@contextlib.contextmanager
def run_query(url: str, sql: str, params: dict[str, str] | None = None
              ) -> Iterator[tuple[list[str], Iterator[Sequence[Any]]]]:
    """(column names, rows) of one read-only statement; rows stream while the block runs."""
    check_read_only(sql)
    conn, error, postgresql = connect_readonly(url)
    try:
        cursor = conn.cursor()
        try:
            if params:
                cursor.execute(_bind(sql, postgresql, params), params)
            else:
                cursor.execute(sql)
        except error as err:
            raise QueryError(f"query failed: {_one_line(err)}") from None
        if cursor.description is None:
            raise QueryError("the statement returned no rows to show")
        yield [d[0] for d in cursor.description], _fetching(cursor, error)
    finally:
        conn.close()


def _fetching(cursor, error: type[Exception]) -> Iterator[Sequence[Any]]:
    try:
        while batch := cursor.fetchmany(1000):
            yield from batch
    except error as err:
        raise QueryError(f"query failed: {_one_line(err)}") from None


# ---------------------------------------------------------------- formats

def _plain(value: Any) -> Any:
    """A value as JSON has it: numbers and booleans stay, times and decimals become text."""
    if isinstance(value, (datetime.datetime, datetime.date, decimal.Decimal)):
        return str(value)
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).hex()
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(_plain(value))


def write_table(columns: list[str], rows: Iterable[Sequence[Any]], out: TextIO) -> None:
    cells = [[_text(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip() + "\n"

    out.write(line(columns))
    out.write(line(["-" * w for w in widths]))
    for row in cells:
        out.write(line(row))
    out.write(f"({len(cells)} row{'' if len(cells) == 1 else 's'})\n")


def write_csv(columns: list[str], rows: Iterable[Sequence[Any]], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_text(v) for v in row] for row in rows)


def _objects(columns: list[str], rows: Iterable[Sequence[Any]]) -> Iterator[str]:
    for row in rows:
        yield json.dumps({c: _plain(v) for c, v in zip(columns, row, strict=True)},
                         ensure_ascii=False)


def write_json(columns: list[str], rows: Iterable[Sequence[Any]], out: TextIO) -> None:
    out.write("[")
    for i, text in enumerate(_objects(columns, rows)):
        out.write(("," if i else "") + "\n" + text)
    out.write("\n]\n")


def write_ndjson(columns: list[str], rows: Iterable[Sequence[Any]], out: TextIO) -> None:
    for text in _objects(columns, rows):
        out.write(text + "\n")


Writer = Callable[[list[str], Iterable[Sequence[Any]], TextIO], None]
FORMATS: dict[str, Writer] = {"table": write_table, "csv": write_csv, "json": write_json,
                              "ndjson": write_ndjson}


# ---------------------------------------------------------------- the command

def answer(sql: str, *, db: str, out: TextIO, now_ns: int, output_format: str = "table",
           since: str | None = None, until: str | None = None) -> None:
    """`sluice query`: print the rows of one read-only statement in a format."""
    from .timestamps import parse_moment, sql_timestamp

    if output_format not in FORMATS:
        raise QueryError(f"--format {output_format!r}: use {', '.join(FORMATS)}")
    params = {name: sql_timestamp(parse_moment(text, f"--{name}", now_ns))
              for name, text in (("since", since), ("until", until)) if text}
    with run_query(db, sql, params) as (columns, rows):
        FORMATS[output_format](columns, rows, out)
