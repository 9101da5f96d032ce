"""Schema migrations: numbered plain-SQL files, applied in order and recorded.

``sql/migrations/NNNN_name.sql`` moves the schema up one version and records itself in
``reactor.schema_migrations`` (so a file applied with ``psql -f`` is recorded too);
``sql/rollback/NNNN_name.sql`` undoes exactly what its twin created. Released files are never
edited: the runner stores each file's checksum and refuses to go on if an applied file changed.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from reactor.core.errors import MigrationError
from reactor.db.sqlfiles import sql_dir

__all__ = [
    "OPTIONAL_VERSIONS",
    "Migration",
    "applied_versions",
    "discover",
    "discover_optional",
    "migrate_down",
    "migrate_optional_down",
    "migrate_optional_up",
    "migrate_up",
    "pending",
]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 7_240_513_001  # pg_advisory_lock key shared by every `reactor migrate`

#: Optional migrations (``sql/optional/<name>.sql`` and ``<name>.down.sql``): applied only when asked
#: for (``reactor migrate --supabase``), recorded in reactor.schema_migrations under a version of their
#: own above ``_OPTIONAL_BASE``, which the numbered migrations never reach. Each needs migration 1.
OPTIONAL_VERSIONS: dict[str, int] = {"supabase": 1001}
_OPTIONAL_BASE = 1000


def _is_optional(version: int) -> bool:
    return version > _OPTIONAL_BASE


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: Path
    down: Path | None

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.up.read_bytes()).hexdigest()


def discover(root: Path | None = None) -> list[Migration]:
    """The migrations shipped with this version, in order."""
    base = root or sql_dir()
    found: list[Migration] = []
    for path in sorted((base / "migrations").glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"migration file name must look like 0001_name.sql: {path.name}")
        down = base / "rollback" / path.name
        found.append(Migration(int(m.group(1)), m.group(2), path, down if down.exists() else None))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


def applied_versions(conn: psycopg.Connection[Any]) -> dict[int, str | None]:
    """Applied version -> recorded checksum (None when applied by hand with psql)."""
    exists = conn.execute("SELECT to_regclass('reactor.schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, checksum FROM reactor.schema_migrations ORDER BY version")
    return {int(v): c for v, c in rows.fetchall()}


def pending(conn: psycopg.Connection[Any], migrations: list[Migration] | None = None) -> list[Migration]:
    """Migrations not applied yet on this database."""
    done = applied_versions(conn)
    return [m for m in (migrations or discover()) if m.version not in done]


def _connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        conn: psycopg.Connection[Any] = psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise MigrationError(f"cannot connect to the database: {exc}") from exc
    return conn


def _apply_and_record(conn: psycopg.Connection[Any], m: Migration) -> None:
    """Run one migration file and record it with its checksum, in one transaction."""
    with conn.transaction():
        conn.execute(m.up.read_text().encode())
        conn.execute(
            "INSERT INTO reactor.schema_migrations (version, name, checksum) "
            "VALUES (%s, %s, %s) ON CONFLICT (version) DO UPDATE SET checksum = EXCLUDED.checksum",
            (m.version, m.name, m.checksum),
        )


def migrate_up(dsn: str, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply what is missing, each file in its own transaction. Returns what was applied."""
    todo = migrations if migrations is not None else discover()
    done_now: list[Migration] = []
    with _connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            done = applied_versions(conn)
            by_version = {m.version: m for m in todo}
            for version, checksum in done.items():
                m = by_version.get(version)
                if m is None and _is_optional(version):
                    continue  # an optional migration: `reactor migrate --<name>` looks after it
                if m is None:
                    raise MigrationError(
                        f"the database is at migration {version}, newer than this reactor knows "
                        f"({len(todo)}): upgrade the reactor, or roll back with the newer one"
                    )
                if checksum is not None and checksum != m.checksum:
                    raise MigrationError(
                        f"migration {m.up.name} was edited after it was applied: "
                        "released migrations must not change; add a new one instead"
                    )
            for m in todo:
                if m.version in done:
                    if done[m.version] is None:  # applied by hand with psql: record what it was
                        conn.execute(
                            "UPDATE reactor.schema_migrations SET checksum = %s WHERE version = %s",
                            (m.checksum, m.version),
                        )
                    continue
                logger.info("applying migration %s", m.up.name)
                try:
                    _apply_and_record(conn, m)
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {m.up.name} failed: {exc}") from exc
                done_now.append(m)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return done_now


def migrate_down(dsn: str, to_version: int = 0, migrations: list[Migration] | None = None) -> list[Migration]:
    """Roll back every applied migration above ``to_version``, newest first."""
    todo = migrations if migrations is not None else discover()
    undone: list[Migration] = []
    with _connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            done = applied_versions(conn)
            if to_version < 1:  # the optional migrations stand on migration 1: they go first
                optional = discover_optional()
                for m in sorted(optional.values(), key=lambda m: m.version, reverse=True):
                    if m.version in done:
                        _roll_back(conn, m)
                        undone.append(m)
            for m in sorted(todo, key=lambda m: m.version, reverse=True):
                if m.version not in done or m.version <= to_version:
                    continue
                _roll_back(conn, m)
                undone.append(m)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return undone


# -- optional migrations ---------------------------------------------------------------------------


def discover_optional(root: Path | None = None) -> dict[str, Migration]:
    """The optional migrations shipped with this version, by name."""
    base = (root or sql_dir()) / "optional"
    found: dict[str, Migration] = {}
    for name, version in OPTIONAL_VERSIONS.items():
        up = base / f"{name}.sql"
        if up.exists():
            down = base / f"{name}.down.sql"
            found[name] = Migration(version, name, up, down if down.exists() else None)
    return found


def _optional(name: str) -> Migration:
    found = discover_optional()
    if name not in found:
        raise MigrationError(
            f"the optional migration {name!r} is not installed (looked for {sql_dir() / 'optional' / name}.sql)"
        )
    return found[name]


def _roll_back(conn: psycopg.Connection[Any], m: Migration) -> None:
    if m.down is None:
        raise MigrationError(f"migration {m.up.name} has no rollback file")
    logger.info("rolling back migration %s", m.up.name)
    try:
        with conn.transaction():
            conn.execute(m.down.read_text().encode())
            if applied_versions(conn):
                conn.execute("DELETE FROM reactor.schema_migrations WHERE version = %s", (m.version,))
    except psycopg.Error as exc:
        raise MigrationError(f"rollback of {m.up.name} failed: {exc}") from exc


def migrate_optional_up(dsn: str, name: str) -> Migration | None:
    """Apply the optional migration ``name`` (in one transaction) unless it is applied already.

    Needs migration 1. Returns the migration when it was applied now, None when it already was.
    """
    m = _optional(name)
    with _connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            done = applied_versions(conn)
            if 1 not in done:
                raise MigrationError(f"{m.up.name} goes on top of the numbered migrations: run `reactor migrate` first")
            if m.version in done:
                checksum = done[m.version]
                if checksum is not None and checksum != m.checksum:
                    raise MigrationError(
                        f"optional migration {m.up.name} was edited after it was applied: "
                        "released migrations must not change; add a new one instead"
                    )
                if checksum is None:
                    conn.execute(
                        "UPDATE reactor.schema_migrations SET checksum = %s WHERE version = %s",
                        (m.checksum, m.version),
                    )
                return None
            logger.info("applying optional migration %s", m.up.name)
            try:
                _apply_and_record(conn, m)
            except psycopg.Error as exc:
                raise MigrationError(f"optional migration {m.up.name} failed: {_primary(exc)}") from exc
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return m


def migrate_optional_down(dsn: str, name: str) -> Migration | None:
    """Roll back the optional migration ``name``; None when it was not applied."""
    m = _optional(name)
    with _connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            if m.version not in applied_versions(conn):
                return None
            _roll_back(conn, m)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return m


def _primary(exc: psycopg.Error) -> str:
    """The server's message and hint, without psycopg's context lines."""
    diag = exc.diag
    if diag.message_primary is None:
        return str(exc)
    return diag.message_primary + (f" ({diag.message_hint})" if diag.message_hint else "")
