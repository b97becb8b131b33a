"""What the export stage reads from the audit store, and where it keeps its cursors.

The stored rows are the export's durable source: `audit_events.id` increases, each sink keeps
the highest id it has delivered in `export_cursors` (per host: on PostgreSQL a fleet shares
the table, and each host exports its own rows), and reads the next rows after it.

Reading "after the cursor" is only safe up to the highest id below which no row can still
appear. On SQLite the writer holds the database's one write lock from the moment it numbers
its rows until it commits, so rows become visible in id order: every id up to the highest
visible one is final. On PostgreSQL ids come from a sequence when a row is inserted, and
transactions commit in any order: a slow transaction's rows can appear after later ids were
already committed (two writers of one host, persist and `sluice import`, or any writers of a
fleet). settled() therefore reads the highest committed id M, then the transactions that hold
a write lock on audit_events at that moment (pg_locks); any row with an id <= M that is not
yet visible belongs to one of them (a row is numbered after its transaction takes the lock).
M counts as settled once all of them have ended. Writers commit in a fraction of a second,
so the export lags by about that much; it waits only for writers of this table, never for
unrelated long transactions. (This assumes the id sequence hands out ids in order, as a
serial column's sequence with its default CACHE 1 does.)
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from ..errors import StoreError
from ..audit.store import (AuditStore, dialect_insert, _one_line, audit_events, export_cursors,
                           open_readonly)
from ..audit.timestamps import sql_timestamp

COLUMNS = tuple(c.name for c in audit_events.columns)  # id first
BOOLEANS = {c.name for c in audit_events.columns if isinstance(c.type, sa.Boolean)}

_WRITERS = sa.text(
    "SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation' "
    "AND relation = 'audit_events'::regclass AND mode = 'RowExclusiveLock' "
    "AND pid <> pg_backend_pid()")
_STILL_WRITING = sa.text(
    "SELECT count(*) FROM pg_locks WHERE virtualtransaction IN :ids").bindparams(
    sa.bindparam("ids", expanding=True))


class StoredRows:
    """This host's audit rows in id order, and the export cursors, in one database."""

    def __init__(self, url: str, host: str) -> None:
        # Reads go through a read-only engine: on SQLite the writer's engine begins every
        # transaction with BEGIN IMMEDIATE, which would take persist's write lock to read.
        self.store = AuditStore(url)
        self.url_text = url
        self.reader: sa.Engine | None = None  # opened by ready()
        self.url, self.host = self.store.url, host
        self.postgresql = self.store.engine.dialect.name == "postgresql"
        self.pending: tuple[int, list[str]] | None = None  # PostgreSQL: (M, its writers)
        self.settled_id = 0
        self.newest = 0  # the highest id seen committed (of any host)
        column = audit_events.c
        self._rows = (sa.select(*audit_events.columns)
                      .where(column.host == sa.bindparam("host"), column.id > sa.bindparam("after"),
                             column.id <= sa.bindparam("upto"))
                      .order_by(column.id).limit(sa.bindparam("limit")))
        self._backlog = sa.select(sa.func.count()).select_from(audit_events).where(
            column.host == sa.bindparam("host"), column.id > sa.bindparam("after"))

    def _run(self, what: str, work, engine: sa.Engine | None = None):
        engine = engine or self.reader
        assert engine is not None, "reads come after ready(), which opens the reader"
        try:
            with engine.connect() as conn:
                return work(conn)
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"{self.url}: cannot {what}: {_one_line(err)}") from None

    def ready(self) -> bool:
        """Whether persist's migrations have made the cursor table (and the database is up)."""
        try:
            if not sa.inspect(self.store.engine).has_table(export_cursors.name):
                return False
            self.reader = self.reader or open_readonly(self.url_text)
        except (sa.exc.SQLAlchemyError, StoreError):
            return False
        return True

    def cursor(self, sink: str) -> int:
        c = export_cursors.c
        query = sa.select(c.last_id).where(c.host == self.host, c.sink == sink)
        return self._run("read the export cursor", lambda conn: conn.execute(query).scalar()) or 0

    def save(self, cursors: dict[str, int]) -> None:
        """Store each sink's cursor in one short transaction."""
        if not cursors:
            return
        now = sql_timestamp(time.time_ns())
        insert = dialect_insert(self.store.engine.dialect.name, export_cursors)
        statement = insert.on_conflict_do_update(
            index_elements=["host", "sink"],
            set_={"last_id": insert.excluded.last_id, "updated_at": insert.excluded.updated_at})
        values = [{"host": self.host, "sink": sink, "last_id": last, "updated_at": now}
                  for sink, last in sorted(cursors.items())]

        def write(conn: sa.Connection) -> None:
            conn.execute(statement, values)
            conn.commit()

        self._run("store the export cursors", write, self.store.engine)

    def settled(self) -> int:
        """The highest id up to which this host's rows are final (see the module doc)."""
        highest = "SELECT max(id) FROM audit_events"
        if not self.postgresql:
            self.newest = self.settled_id = self._run("read the newest id", lambda conn: (
                conn.exec_driver_sql(highest).scalar() or 0))
            return self.settled_id

        def look(conn: sa.Connection) -> int:
            top = self.newest = conn.exec_driver_sql(highest).scalar() or 0
            if self.pending is not None:
                mark, writers = self.pending
                if conn.execute(_STILL_WRITING, {"ids": writers}).scalar():
                    return self.settled_id
                self.settled_id, self.pending = max(self.settled_id, mark), None
            writers = list(conn.execute(_WRITERS).scalars())  # after reading top: see above
            if writers:
                self.pending = (top, writers)
            else:
                self.settled_id = max(self.settled_id, top)
            return self.settled_id

        return self._run("read the newest id", look)

    def rows(self, after: int, upto: int, limit: int) -> list[tuple]:
        """This host's rows with after < id <= upto, in id order, at most limit; each row is
        a tuple in COLUMNS order."""
        params = {"host": self.host, "after": after, "upto": upto, "limit": limit}
        return self._run("read audit rows", lambda conn: [
            tuple(row) for row in conn.execute(self._rows, params)])

    def backlog(self, after: int) -> int:
        """How many of this host's rows are stored after `after` (not yet delivered)."""
        return self._run("count the backlog", lambda conn: conn.execute(
            self._backlog, {"host": self.host, "after": after}).scalar() or 0)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.dispose()
        self.store.close()
