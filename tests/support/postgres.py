"""The PostgreSQL server the store tests use (./bootstrap test starts it): reach it, and make a
fresh schema per test."""

from __future__ import annotations

import contextlib
import uuid

import sqlalchemy as sa

POSTGRES_URL_VARIABLE = "SLUICE_TEST_POSTGRES_URL"  # test config, set by ./bootstrap test


def postgres_engine(url: str) -> sa.Engine:
    parsed = sa.make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed, isolation_level="AUTOCOMMIT")


def postgres_unavailable(url: str) -> str:
    if not url:
        return f"needs a PostgreSQL server: set {POSTGRES_URL_VARIABLE} (./bootstrap test does)"
    try:
        engine = postgres_engine(url)
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
    except Exception as err:  # noqa: BLE001 - any failure to connect means "not available"
        return f"cannot reach PostgreSQL at {POSTGRES_URL_VARIABLE}: {type(err).__name__}"
    return ""


@contextlib.contextmanager
def postgres_schema(url: str):
    """The URL of a new, empty schema on the server at url; dropped afterwards."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = postgres_engine(url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield sa.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}) \
            .render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
