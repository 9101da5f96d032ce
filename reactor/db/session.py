"""A plain synchronous connection for the runbook, the checks, the smoke test and the dashboard's
actions: named queries of ``sql/ops.sql``, dict rows, psycopg's errors turned into the reactor's.

Each change runs in one transaction that names its author in ``job_events.actor``
(:meth:`Session.change`); reads that must agree with each other run in one transaction too
(:meth:`Session.reading`). Errors leave as :class:`~reactor.core.errors.DatabaseError` with the
server's own words; a missing schema says to run ``reactor migrate``.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from reactor.core.errors import DatabaseError, StatementRefused
from reactor.core.logs import redact
from reactor.db.migrations import applied_versions
from reactor.db.sqlfiles import load_queries

__all__ = ["Row", "Session", "conninfo_params", "listen_round_trip", "migration_state"]

Row = dict[str, Any]


def _q() -> dict[str, str]:
    return load_queries("ops.sql")


def message(exc: BaseException) -> str:
    """The server's own words (and hint) for a psycopg error, else the error's text."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        return " ".join(str(exc).split())
    hint = getattr(diag, "message_hint", None)
    return f"{primary} ({hint})" if hint else str(primary)


@contextlib.contextmanager
def _database_errors() -> Iterator[None]:
    """psycopg errors out of the block become ``DatabaseError`` (a missing schema says what to do)."""
    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction,
            psycopg.errors.InvalidSchemaName) as exc:
        what = exc.diag.message_primary or str(exc).strip()
        raise DatabaseError(
            f"{what}: the reactor's schema is missing or older than this reactor; run `reactor migrate`"
        ) from exc
    except psycopg.Error as exc:
        raise DatabaseError(message(exc)) from exc


class Session:
    """One autocommit connection with dict rows (use ``with``; :meth:`connect` opens one)."""

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self._conn = conn

    @classmethod
    def connect(cls, dsn: str, *, connect_timeout: int = 10, application_name: str | None = "reactor cli",
                options: str | None = None) -> Session:
        """``DatabaseError`` ("cannot connect to the database: ...", passwords hidden) when it cannot."""
        extra: dict[str, Any] = {}
        if application_name is not None:
            extra["application_name"] = application_name
        if options is not None:
            extra["options"] = options
        try:
            conn: psycopg.Connection[Row] = psycopg.connect(
                dsn, autocommit=True, row_factory=dict_row, connect_timeout=connect_timeout, **extra)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to the database: {redact(message(exc))}") from exc
        return cls(conn)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    # -- statements --------------------------------------------------------------------------------

    def one(self, name: str, params: Mapping[str, Any] | None = None) -> Row | None:
        """The first row of a named query (None: no row)."""
        with _database_errors():
            return self._conn.execute(_q()[name], params or {}).fetchone()

    def all(self, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        with _database_errors():
            return self._conn.execute(_q()[name], params or {}).fetchall()

    def run(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        """A named statement that returns no rows."""
        with _database_errors():
            self._conn.execute(_q()[name], params or {})

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Reads that see one snapshot of the database (one transaction)."""
        with _database_errors(), self._conn.transaction():
            yield

    @contextlib.contextmanager
    def change(self, actor: str) -> Iterator[None]:
        """One transaction that records its author (``job_events.actor``); an exception undoes it."""
        with _database_errors(), self._conn.transaction():
            self._conn.execute(_q()["set_actor"], {"actor": actor})
            yield

    def cast(self, value: str | None, type_name: str) -> None:
        """Whether PostgreSQL can read ``value`` as ``type_name`` (a type from the catalog):
        :class:`StatementRefused` with its words when it cannot."""
        try:
            self._conn.execute(sql.SQL("SELECT CAST(%s::text AS {})").format(sql.SQL(type_name)), (value,))
        except psycopg.Error as exc:
            raise StatementRefused(message(exc)) from exc

    def update(self, table: str, values: Mapping[str, str | None], types: Mapping[str, str]) -> None:
        """``UPDATE table SET column = CAST(value AS type), ...`` (table and types from the catalog):
        :class:`StatementRefused` with the triggers' and constraints' own words when refused."""
        statement = sql.SQL("UPDATE {} SET {}").format(
            sql.SQL(table),
            sql.SQL(", ").join(
                sql.SQL("{} = CAST(%s::text AS {})").format(sql.Identifier(k), sql.SQL(types[k])) for k in values
            ),
        )
        try:
            self._conn.execute(statement, list(values.values()))
        except psycopg.Error as exc:
            raise StatementRefused(message(exc)) from exc


# -- checks ------------------------------------------------------------------------------------------


def conninfo_params(dsn: str) -> dict[str, str]:
    """libpq's reading of a DSN (URL or key=value), or {} when it cannot read it."""
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except psycopg.Error:
        return {}


def listen_round_trip(dsn: str, timeout_s: float) -> bool:
    """Whether a NOTIFY sent on one fresh connection reaches a LISTEN on another within ``timeout_s``
    (``DatabaseError`` when either cannot be made or used)."""
    channel = f"reactor_check_{secrets.token_hex(6)}"
    token = secrets.token_hex(8)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as listener, \
                psycopg.connect(dsn, autocommit=True, connect_timeout=10) as sender:
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            sender.execute("SELECT pg_notify(%s, %s)", (channel, token))
            for note in listener.notifies(timeout=timeout_s, stop_after=1):
                if note.channel == channel and note.payload == token:
                    return True
    except psycopg.Error as exc:
        raise DatabaseError(message(exc)) from exc
    return False


def migration_state(dsn: str) -> dict[int, str | None]:
    """Applied migration version -> recorded checksum (``DatabaseError`` when it cannot be read)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            return applied_versions(conn)
    except psycopg.Error as exc:
        raise DatabaseError(message(exc)) from exc
