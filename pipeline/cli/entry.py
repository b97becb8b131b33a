"""The `sluice` executable.

`sluice run STAGE` and `sluice query` take short paths. A stage never needs the command
framework, so its long-lived process does not hold it. `sluice query` loads neither the
command framework nor the writer's SQLAlchemy, only the database driver: a question over a
rollup view is answered in a fraction of a second, start-up included. Anything the short
path does not parse (help, a mistake) goes to the full command line in pipeline/cli/app.py,
which runs the same query code.
"""

from __future__ import annotations

import os
import sys
import time

_QUERY_OPTIONS = {"--db": "db", "--format": "output_format", "-f": "output_format",
                  "--since": "since", "--until": "until"}


def quick_query(args: list[str]) -> int | None:
    """Run `sluice query ARGS`; None when the full command line should handle them."""
    values: dict[str, str] = {}
    sql: list[str] = []
    rest = iter(args)
    for arg in rest:
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in _QUERY_OPTIONS:
            if not eq:
                following = next(rest, None)
                if following is None:
                    return None
                value = following
            values[_QUERY_OPTIONS[name]] = value
        elif arg.startswith("-"):
            return None  # --help, or an option the full command line explains
        else:
            sql.append(arg)
    if len(sql) != 1:
        return None
    from ..errors import SluiceError, report
    from ..audit.query import answer

    try:
        if "db" not in values:
            from ..settings import Settings

            values["db"] = Settings.from_env(os.environ).db
        answer(sql[0], out=sys.stdout, now_ns=time.time_ns(), **values)
    except SluiceError as err:
        return report(err)
    except BrokenPipeError:  # `sluice query ... | head`
        sys.stderr.close()
    return 0


def quick_run(stage: str) -> int | None:
    """`sluice run STAGE` without the command framework: six long-lived processes would each
    keep its modules in memory for nothing. None when the full command line should explain."""
    from ..topology import STAGES

    if stage not in STAGES:
        return None
    from ..errors import SluiceError, report
    from ..stages import run_named

    try:
        return run_named(stage)
    except SluiceError as err:
        return report(err)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        code = quick_run(sys.argv[2])
        if code is not None:
            sys.exit(code)
    if sys.argv[1:2] == ["query"]:
        code = quick_query(sys.argv[2:])
        if code is not None:
            sys.exit(code)
    from .app import main as full

    full()


if __name__ == "__main__":
    main()
