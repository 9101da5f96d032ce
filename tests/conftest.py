"""Test harness: one private PostgreSQL per test session; a fresh migrated database per test.

The server runs as an unprivileged OS user when the tests run as root (CI), as the current user
otherwise. pytest-postgresql builds a migrated template database once and clones it per test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pytest_postgresql import factories

from reactor.db.embedded import EmbeddedPostgres
from reactor.db.migrations import migrate_up
from tests import hypothesis_profiles  # noqa: F401 - registers and loads the fuzz tests' profile


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    base = os.environ.get("REACTOR_TEST_PGDIR")
    server = EmbeddedPostgres(Path(base) if base else None)
    server.start()
    try:
        yield server
    finally:
        server.destroy()


def load_schema(host: str, port: int, user: str, dbname: str, password: str | None, **_: object) -> None:
    migrate_up(f"postgresql://{user}@{host}:{port}/{dbname}")


postgresql_template = factories.postgresql_noproc(depends_on="pg_server", load=[load_schema])
postgresql = factories.postgresql("postgresql_template")


@pytest.fixture
def dsn(postgresql: psycopg.Connection[object]) -> str:
    """DSN of this test's fresh, migrated database."""
    info = postgresql.info
    return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection[object]]:
    """An autocommit connection to this test's database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
