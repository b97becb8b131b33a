"""Files people hand us, read with limits: size, line length and JSON nesting.

Policy files, NDJSON audit logs, recording headers and lists of expected blocks are read
through here, so a file that is huge, holds an endless line or nests 100,000 levels deep is
one clear problem naming the file, the line and what is wrong: never a RecursionError, a
traceback or a stage brought down. Pure apart from reading the file it is given.

    read_json_file(path, max_bytes=..., max_depth=...)     one JSON document
    json_lines(f, name, max_line_bytes=..., max_depth=...)  (line number, document or problem)
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

MAX_DEPTH = 32              # real documents nest 2 to 5 levels
MAX_FILE_BYTES = 64 << 20
MAX_LINE_BYTES = 1 << 20
_SKIP_CHUNK = 1 << 20

# JSON strings (which may hold brackets), then the brackets themselves.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


class LimitError(ValueError):
    """A document over a limit, or not JSON. `reason` is the stable part (what is counted);
    str() adds the detail (where in the document)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


def nesting_problem(text: str, max_depth: int = MAX_DEPTH) -> str | None:
    """Why text nests too deep for the JSON decoder to be given it, or None."""
    depth = 0
    for bracket in _BRACKET.finditer(_STRING.sub("", text)):
        if bracket.group() in "[{":
            depth += 1
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
        else:
            depth -= 1
    return None


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH,
          object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """json.loads with a nesting limit; LimitError for any document it will not take."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise LimitError("not UTF-8 text") from None
    problem = nesting_problem(text, max_depth)
    if problem:
        raise LimitError(problem)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as err:
        where = (f"column {err.colno}" if err.lineno == 1
                 else f"line {err.lineno} column {err.colno}")
        raise LimitError("not JSON", f"{where}: {err.msg}") from None
    except RecursionError:  # cannot happen under the depth limit; never a crash if it does
        raise LimitError(f"nested deeper than {max_depth} levels") from None


def read_text(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A UTF-8 file of at most max_bytes; LimitError (with the reason) otherwise.
    OSError is passed on for the caller to word."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LimitError(f"larger than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise LimitError("not UTF-8 text") from None


def read_json_file(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES,
                   max_depth: int = MAX_DEPTH, object_pairs_hook=None) -> Any:
    """One JSON document from a file, within limits; LimitError("<path>: <problem>")."""
    try:
        text = read_text(path, max_bytes=max_bytes)
        return loads(text, max_depth=max_depth, object_pairs_hook=object_pairs_hook)
    except LimitError as err:
        raise LimitError(f"{path}: {err.reason}", str(err)[len(err.reason) + 2:-1]) from None
    except OSError as err:
        raise LimitError(f"{path}: cannot read", err.strerror or str(err)) from None


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    """One line of a JSON-lines file: its document, or why it has none."""

    number: int
    raw: bytes          # without the line end; b"" for an overlong line
    document: Any = None
    problem: str = ""   # "" when document holds the line's JSON; else the stable reason
    detail: str = ""    # the problem with where it is in the line


def lines(f: BinaryIO, *,
          max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line without its end) of a binary file; None for a line longer than
    max_line_bytes, which is skipped without being held in memory."""
    number = 0
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return
        number += 1
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := f.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, line.rstrip(b"\r\n")


def json_lines(f: BinaryIO, *, max_line_bytes: int = MAX_LINE_BYTES,
               max_depth: int = MAX_DEPTH) -> Iterator[Line]:
    """Every line of an NDJSON file, each with its document or its problem; blank lines too
    (problem "blank line"), so that line numbers and counts stay the file's own."""
    for number, raw in lines(f, max_line_bytes=max_line_bytes):
        if raw is None:
            problem = f"line longer than {max_line_bytes} bytes"
            yield Line(number, b"", problem=problem, detail=problem)
        elif not raw.strip():
            yield Line(number, raw, problem="blank line", detail="blank line")
        else:
            try:
                yield Line(number, raw, loads(raw, max_depth=max_depth))
            except LimitError as err:
                yield Line(number, raw, problem=err.reason, detail=str(err))
