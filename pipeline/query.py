"""Read-only SQL over the audit store (`sluice query`) and its output formats.

Two locks keep a query from changing the store: only one SELECT (or WITH ... SELECT, or
VALUES) statement is accepted, and it runs on a read-only connection (SQLite opened
mode=ro with query_only; PostgreSQL in a read-only session), so whatever the first check
misses the database itself refuses.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import json
import re
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

import sqlalchemy as sa

from .errors import StoreError
from .store import open_readonly

READING_KEYWORDS = ("select", "with", "values")
# What may hide a semicolon or a keyword: string literals, quoted names and comments.
_NOT_CODE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.S)


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


@contextlib.contextmanager
def run_query(url: str, sql: str) -> Iterator[tuple[list[str], Iterator[Sequence[Any]]]]:
    """(column names, rows) of one read-only statement; rows stream while the block runs."""
    check_read_only(sql)
    engine = open_readonly(url)
    try:
        with engine.connect() as conn:
            try:
                result = conn.exec_driver_sql(sql)
            except sa.exc.SQLAlchemyError as err:
                raise QueryError(f"query failed: {_one_line(err)}") from None
            if not result.returns_rows:
                raise QueryError("the statement returned no rows to show")
            yield list(result.keys()), _fetching(result)
    finally:
        engine.dispose()


def _fetching(result: sa.CursorResult) -> Iterator[Sequence[Any]]:
    try:
        while batch := result.fetchmany(1000):
            yield from batch
    except sa.exc.SQLAlchemyError as err:
        raise QueryError(f"query failed: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    inner = getattr(err, "orig", None) or err
    return " ".join(str(inner).split()) or type(inner).__name__


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
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip() + "\n"

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
        yield json.dumps({c: _plain(v) for c, v in zip(columns, row)}, ensure_ascii=False)


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
