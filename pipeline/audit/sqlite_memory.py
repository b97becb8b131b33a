"""SQLite's allocator without its memory statistics, for persist's write path.

By default SQLite counts every allocation and free under one global mutex
(SQLITE_CONFIG_MEMSTATUS). sluice never reads those counts, and in persist's insert, which
binds about twenty values a row, the counting costs about 8% of the instructions a record
takes. The setting can only be made before the library initializes, which Python's sqlite3
module does when it is first imported; so it is made before that import, or not at all.
"""

from __future__ import annotations

import sys

_CONFIG_MEMSTATUS = 9  # sqlite3.h: SQLITE_CONFIG_MEMSTATUS
_LIBRARY = "libsqlite3.so.0"  # the shared library Python's sqlite3 module links on Linux
_done: bool | None = None


def skip_memory_statistics() -> bool:
    """Turn the statistics off if SQLite has not started in this process; True when off.

    Only a speed-up: where it cannot apply (sqlite3 already imported, a Python with its own
    SQLite linked in), SQLite works as it always does.
    """
    global _done
    if _done is None:
        _done = "_sqlite3" not in sys.modules and _configure()
    return _done


def _configure() -> bool:
    import ctypes  # here: a process that never opens SQLite does not load it

    try:
        library = ctypes.CDLL(_LIBRARY)
    except OSError:
        return False
    return library.sqlite3_config(_CONFIG_MEMSTATUS, ctypes.c_int(0)) == 0
