"""The chaos suite's database: one private PostgreSQL per test module (the tests restart it), and a
fresh migrated database per test, cloned from a template.

Tests marked ``slow`` here are the long versions of the scenarios: they are skipped unless the run
selects them by marker (``pytest tests/chaos -m slow``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from reactor.db.embedded import EmbeddedPostgres
from reactor.db.migrations import migrate_up
from tests.support.cluster import CHAOS_PG_SETTINGS

HERE = Path(__file__).resolve().parent
_numbers = itertools.count(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long chaos scenario: run by hand with -m slow")
    for item in items:
        if "slow" in item.keywords and item.path.is_relative_to(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def chaos_pg() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(settings=CHAOS_PG_SETTINGS)
    try:
        dsn = server.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE chaos_template")
        migrate_up(server.dsn_for("chaos_template"))
        yield server
    finally:
        server.destroy()


@pytest.fixture
def chaos_dsn(chaos_pg: EmbeddedPostgres) -> str:
    """A fresh, migrated database on the module's server."""
    name = f"chaos_{next(_numbers)}"
    with psycopg.connect(chaos_pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE chaos_template")
    return chaos_pg.dsn_for(name)
