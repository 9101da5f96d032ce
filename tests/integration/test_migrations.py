"""Migrations: up, idempotent re-run, exact rollback, the CLI, psql-applied files, edit detection."""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from reactor.cli.main import main
from reactor.core.errors import MigrationError
from reactor.db.embedded import EmbeddedPostgres
from reactor.db.migrations import applied_versions, discover, migrate_down, migrate_up

# Every user-visible catalog object, by name and kind. OIDs are kept apart (see ``snapshot``):
# they differ between two creations of the same object, so they are compared only where the
# claim is that nothing was dropped and recreated.
_USER_NS = (
    "n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'"
)
_CATALOG = f"""
SELECT 'pg_namespace', n.nspname::text, n.oid
  FROM pg_namespace n WHERE {_USER_NS}
UNION ALL
SELECT 'pg_class', format('%s.%s kind=%s', n.nspname, c.relname, c.relkind), c.oid
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_NS}
UNION ALL
SELECT 'pg_attribute', format('%s.%s.%s %s', n.nspname, c.relname, a.attname,
                              format_type(a.atttypid, a.atttypmod)), c.oid
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE {_USER_NS} AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'pg_proc', format('%s.%s(%s) kind=%s', n.nspname, p.proname,
                         pg_get_function_identity_arguments(p.oid), p.prokind), p.oid
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {_USER_NS}
UNION ALL
SELECT 'pg_type', format('%s.%s kind=%s', n.nspname, t.typname, t.typtype), t.oid
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {_USER_NS}
UNION ALL
SELECT 'pg_trigger', format('%s.%s.%s type=%s', n.nspname, c.relname,
                            -- internal (foreign key) triggers are named after their own OID
                            CASE WHEN g.tgisinternal
                                 THEN regexp_replace(g.tgname, '_[0-9]+$', '') || ' for '
                                      || (SELECT k.conname FROM pg_constraint k
                                           WHERE k.oid = g.tgconstraint)
                                 ELSE g.tgname END, g.tgtype), g.oid
  FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_NS}
UNION ALL
SELECT 'pg_constraint', format('%s.%s kind=%s on=%s', n.nspname, k.conname, k.contype,
                               coalesce(k.conrelid::regclass::text, k.contypid::regtype::text)), k.oid
  FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace WHERE {_USER_NS}
UNION ALL
SELECT 'pg_views', format('%s.%s: %s', v.schemaname, v.viewname, v.definition), 0::oid
  FROM pg_views v WHERE v.schemaname NOT IN ('pg_catalog', 'information_schema')
UNION ALL
SELECT 'pg_extension', x.extname::text, x.oid FROM pg_extension x
UNION ALL
SELECT 'pg_event_trigger', e.evtname::text, e.oid FROM pg_event_trigger e
"""

Snapshot = frozenset[tuple[str, str]]


def snapshot(dsn: str, *, with_oids: bool = False) -> frozenset[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(_CATALOG).fetchall()
    if with_oids:
        return frozenset((kind, name, int(oid)) for kind, name, oid in rows)
    return frozenset((kind, name) for kind, name, _ in rows)


@pytest.fixture
def fresh_dsn(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """DSN of a brand-new, unmigrated database (cloned from template1), dropped afterwards."""
    name = f"mig_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pg_server.dsn_for(name)
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _has_schema(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass('reactor.jobs') IS NOT NULL").fetchone()
    assert row is not None
    return bool(row[0])


def _ledger(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM reactor.schema_migrations ORDER BY version")
        return cur.fetchall()


def test_up_creates_the_contract_rerun_is_noop_and_down_restores_catalog(fresh_dsn: str) -> None:
    before = snapshot(fresh_dsn)
    assert ("pg_namespace", "reactor") not in before

    applied = migrate_up(fresh_dsn)
    assert [(m.version, m.name) for m in applied] == [(m.version, m.name) for m in discover()]
    assert applied, "there is at least one migration"

    after = snapshot(fresh_dsn)
    created = after - before
    for expected in [
        ("pg_namespace", "reactor"),
        ("pg_class", "reactor.jobs kind=r"),
        ("pg_class", "public.job_queue_config kind=r"),
        ("pg_class", "public.job_types kind=r"),
        ("pg_class", "public.jobs kind=v"),
        ("pg_class", "public.job_events kind=v"),
        ("pg_class", "reactor.schema_migrations kind=r"),
    ]:
        assert expected in created, expected
    created_functions = {
        name.split("(")[0] for kind, name in created if kind == "pg_proc" and name.endswith("kind=f")
    }
    assert {"public.get_queue_stats", "public.update_queue_positions"} <= created_functions
    assert not before - after, "migrating up removed objects that existed before"

    ledger = _ledger(fresh_dsn)
    assert [(r["version"], r["checksum"]) for r in ledger] == [
        (m.version, hashlib.sha256(m.up.read_bytes()).hexdigest()) for m in discover()
    ]

    # Second run: nothing applied, nothing dropped and recreated (same OIDs), ledger untouched.
    with_oids = snapshot(fresh_dsn, with_oids=True)
    assert migrate_up(fresh_dsn) == []
    assert snapshot(fresh_dsn, with_oids=True) == with_oids
    assert _ledger(fresh_dsn) == ledger

    undone = migrate_down(fresh_dsn)
    assert [m.version for m in undone] == sorted((m.version for m in discover()), reverse=True)
    restored = snapshot(fresh_dsn)
    assert restored == before, {
        "left behind": sorted(restored - before),
        "missing": sorted(before - restored),
    }
    assert migrate_down(fresh_dsn) == []

    # And the cycle can be run again.
    assert len(migrate_up(fresh_dsn)) == len(discover())
    assert snapshot(fresh_dsn) == after


def test_cli_migrate_with_dsn_and_down(
    fresh_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # --dsn wins over a DATABASE_URL that points nowhere.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nowhere")
    assert main(["migrate", "--dsn", fresh_dsn]) == 0
    assert _has_schema(fresh_dsn)
    assert "applied 0001_jobs" in capsys.readouterr().out

    assert main(["migrate", "--dsn", fresh_dsn]) == 0
    assert "up to date" in capsys.readouterr().out

    assert main(["migrate", "--dsn", fresh_dsn, "--down"]) == 0
    assert not _has_schema(fresh_dsn)
    assert "rolled back 0001_jobs" in capsys.readouterr().out


def test_cli_migrate_with_database_url(
    fresh_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", fresh_dsn)
    assert main(["migrate"]) == 0
    assert _has_schema(fresh_dsn)
    assert "applied 0001_jobs" in capsys.readouterr().out
    assert main(["migrate"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_migrate_without_dsn_fails_naming_both(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["migrate"]) != 0
    err = capsys.readouterr().err
    assert "--dsn" in err
    assert "DATABASE_URL" in err


def _psql(dsn: str, path: str) -> None:
    proc = subprocess.run(
        ["psql", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", path, dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_files_applied_with_psql_record_themselves(fresh_dsn: str) -> None:
    before = snapshot(fresh_dsn)
    migrations = discover()
    for m in migrations:
        _psql(fresh_dsn, str(m.up))

    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        # Applied by hand: recorded, without a checksum.
        assert applied_versions(conn) == {m.version: None for m in migrations}
    with_oids = snapshot(fresh_dsn, with_oids=True)
    assert migrate_up(fresh_dsn) == []
    assert snapshot(fresh_dsn, with_oids=True) == with_oids

    # The rollback files work by hand too, in reverse order, and restore the catalog.
    for m in reversed(migrations):
        assert m.down is not None
        _psql(fresh_dsn, str(m.down))
    assert snapshot(fresh_dsn) == before


def test_edited_migration_is_refused(
    fresh_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    migrate_up(fresh_dsn)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("UPDATE reactor.schema_migrations SET checksum = %s WHERE version = 1", ("0" * 64,))
    with_oids = snapshot(fresh_dsn, with_oids=True)

    with pytest.raises(MigrationError, match="edited"):
        migrate_up(fresh_dsn)
    assert snapshot(fresh_dsn, with_oids=True) == with_oids

    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["migrate", "--dsn", fresh_dsn]) != 0
    assert "0001_jobs.sql" in capsys.readouterr().err


_DEFINITIONS = """
SELECT pg_get_functiondef('reactor.claim_jobs(text, integer, interval, timestamptz)'::regprocedure),
       pg_get_functiondef('reactor.finish_and_claim(jsonb, text, integer, interval, timestamptz)'::regprocedure),
       (SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t
         WHERE t.tgrelid = 'reactor.jobs'::regclass AND t.tgname = 'jobs_stage_updates')
"""


def test_rolling_back_0004_puts_back_the_staged_journal_for_the_reactors_writes(fresh_dsn: str) -> None:
    """0004 replaces two functions and a trigger of 0001: its rollback restores them as they were."""
    earlier = [m for m in discover() if m.version < 4]
    direct = [m for m in discover() if m.version == 4]
    migrate_up(fresh_dsn, earlier)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        before = conn.execute(_DEFINITIONS).fetchone()
    assert migrate_up(fresh_dsn, earlier + direct) == direct
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        assert conn.execute(_DEFINITIONS).fetchone() != before
    assert migrate_down(fresh_dsn, to_version=3) == direct
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        assert conn.execute(_DEFINITIONS).fetchone() == before


def test_0005_keeps_the_claims_plan_and_its_rollback_lets_the_planner_choose(fresh_dsn: str) -> None:
    query = ("SELECT proconfig FROM pg_proc "
             "WHERE oid = 'reactor.claim_jobs(text, integer, interval, timestamptz)'::regprocedure")
    migrate_up(fresh_dsn, [m for m in discover() if m.version <= 5])
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        assert conn.execute(query).fetchone() == (["plan_cache_mode=force_generic_plan"],)
    migrate_down(fresh_dsn, to_version=4)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        assert conn.execute(query).fetchone() == (None,)


# Definitions too, not only names: what a rollback must put back exactly.
_ALL_DEFINITIONS = f"""
SELECT 'def', pg_get_functiondef(p.oid) || coalesce(p.proacl::text, '') || p.prosecdef::text
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {_USER_NS} AND p.prokind IN ('f', 'p')
UNION ALL
SELECT 'def', pg_get_triggerdef(g.oid) FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_NS} AND NOT g.tgisinternal
UNION ALL
SELECT 'def', format('%s %s %s', k.conname, pg_get_constraintdef(k.oid), k.condeferrable)
  FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace WHERE {_USER_NS}
UNION ALL
SELECT 'def', i.indexdef FROM pg_indexes i WHERE i.schemaname NOT IN ('pg_catalog', 'information_schema')
UNION ALL
SELECT 'def', format('%s.%s %s', n.nspname, c.relname, pg_get_viewdef(c.oid))
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_NS} AND c.relkind IN ('v', 'm')
UNION ALL
SELECT 'def', format('%s.%s %s', c.relname, a.attname, coalesce(c.relacl::text, ''))
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE {_USER_NS} AND a.attnum > 0 AND NOT a.attisdropped
"""


def definitions(dsn: str) -> frozenset[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return snapshot(dsn) | frozenset(tuple(r) for r in conn.execute(_ALL_DEFINITIONS).fetchall())


@pytest.mark.parametrize("version", [12, 13, 14, 15, 16, 17, 18])
def test_rolling_back_a_migration_puts_back_exactly_what_the_one_before_made(fresh_dsn: str, version: int) -> None:
    # 0012_commit_path over 0011; 0013_dedup_cache_retention over 0012 (not 0011: its rollback must
    # leave 0012's commit path in place)
    migrate_up(fresh_dsn, [m for m in discover() if m.version < version])
    before = definitions(fresh_dsn)
    migrate_up(fresh_dsn, [m for m in discover() if m.version <= version])
    assert max(applied_versions_of(fresh_dsn)) == version
    migrate_down(fresh_dsn, to_version=version - 1)
    back = definitions(fresh_dsn)
    assert back == before, {"left behind": sorted(back - before), "missing": sorted(before - back)}


def test_later_migrations_keep_0012s_commit_path(fresh_dsn: str) -> None:
    # 0012 reads the jobs a commit queued by key (LATERAL ... OFFSET 0); a later migration that
    # replaced reactor.sequence_commit() with an older body would silently undo that
    query = "SELECT pg_get_functiondef('reactor.sequence_commit()'::regprocedure)"
    migrate_up(fresh_dsn, [m for m in discover() if m.version <= 12])
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        at_12 = conn.execute(query).fetchone()
    assert at_12 is not None and "CROSS JOIN LATERAL" in at_12[0] and "OFFSET 0" in at_12[0]
    migrate_up(fresh_dsn)
    assert max(applied_versions_of(fresh_dsn)) == max(m.version for m in discover())
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        assert conn.execute(query).fetchone() == at_12


def applied_versions_of(dsn: str) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return set(applied_versions(conn))
