"""The optional Supabase hardening (sql/optional/supabase.sql) on plain PostgreSQL.

The test database is made to look like Supabase's: the roles ``anon``, ``authenticated`` and
``service_role`` (this one without BYPASSRLS, so its own policies are what let it through), Supabase's
default privileges (everything created in schema public is granted to all three), and an
``auth.uid()`` that reads the JWT claims PostgREST puts in ``request.jwt.claim.sub`` /
``request.jwt.claims``. Roles belong to the cluster: each test creates them and drops them again.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from reactor.cli.main import main
from reactor.db.embedded import EmbeddedPostgres
from reactor.db.migrations import applied_versions, discover, migrate_down, migrate_optional_up, migrate_up
from reactor.db.sqlfiles import sql_dir
from tests.integration.test_migrations import definitions, snapshot

ROLES = ("anon", "authenticated", "service_role")
SUPABASE = sql_dir() / "optional" / "supabase.sql"
SUPABASE_DOWN = sql_dir() / "optional" / "supabase.down.sql"

# Supabase's auth.uid(): the "sub" claim of the request's JWT, as PostgREST sets it.
AUTH_SCHEMA = """
CREATE SCHEMA auth;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid
$$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
"""
SUPABASE_DEFAULT_PRIVILEGES = """
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
"""

# What the hardening changes beyond names: privileges (effective, defaults expanded), policies, row
# level security flags, SECURITY DEFINER and function settings, column defaults.
_USER_NS = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'"
_SECURITY = f"""
SELECT format('acl %s.%s kind=%s %s %s%s', n.nspname, c.relname, c.relkind,
              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
              a.privilege_type, CASE WHEN a.is_grantable THEN '*' ELSE '' END)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
       aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
 WHERE {_USER_NS}
UNION ALL
SELECT format('acl %s.%s.%s %s %s', n.nspname, c.relname, t.attname,
              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type)
  FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace,
       aclexplode(t.attacl) a
 WHERE {_USER_NS} AND t.attnum > 0
UNION ALL
SELECT format('acl %s.%s(%s) %s %s', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid),
              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace,
       aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
 WHERE {_USER_NS}
UNION ALL
SELECT format('acl schema %s %s %s', n.nspname,
              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type)
  FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
 WHERE {_USER_NS}
UNION ALL
SELECT format('policy %s.%s %s %s to=%s using=%s check=%s', schemaname, tablename, policyname, cmd, roles,
              qual, with_check)
  FROM pg_policies
UNION ALL
SELECT format('rls %s.%s %s %s', n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE {_USER_NS} AND c.relkind = 'r'
UNION ALL
SELECT format('function %s.%s(%s) secdef=%s config=%s', n.nspname, p.proname,
              pg_get_function_identity_arguments(p.oid), p.prosecdef, p.proconfig)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE {_USER_NS}
UNION ALL
SELECT format('default %s.%s.%s = %s', n.nspname, c.relname, t.attname, pg_get_expr(d.adbin, d.adrelid))
  FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute t ON t.attrelid = d.adrelid AND t.attnum = d.adnum
 WHERE {_USER_NS}
"""


def catalog(dsn: str) -> frozenset[tuple[Any, ...]]:
    """Names and kinds of every object (tests/integration/test_migrations.py), plus security."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        security = frozenset(("security", r[0]) for r in conn.execute(_SECURITY).fetchall())
    return snapshot(dsn) | security


def _admin(pg_server: EmbeddedPostgres, statement: str) -> None:
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(statement.encode())


@contextmanager
def _database(pg_server: EmbeddedPostgres, *setup: str) -> Iterator[str]:
    name = f"supa_{uuid.uuid4().hex[:12]}"
    _admin(pg_server, f'CREATE DATABASE "{name}"')
    dsn = pg_server.dsn_for(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in setup:
                conn.execute(statement.encode())
        yield dsn
    finally:
        _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() points the root logger at this test's captured stderr: undo that afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def supabase_roles(pg_server: EmbeddedPostgres) -> Iterator[None]:
    for role in ROLES:
        _admin(pg_server, f"CREATE ROLE {role} NOLOGIN")
    try:
        yield
    finally:
        for role in ROLES:
            _admin(pg_server, f"DROP ROLE IF EXISTS {role}")


@pytest.fixture
def supa_dsn(pg_server: EmbeddedPostgres, supabase_roles: None) -> Iterator[str]:
    """A database set up like Supabase's, with the numbered migrations applied (not the hardening)."""
    with _database(pg_server, SUPABASE_DEFAULT_PRIVILEGES, AUTH_SCHEMA) as dsn:
        migrate_up(dsn)
        yield dsn


@pytest.fixture
def hardened(supa_dsn: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["--log-level", "WARNING", "migrate", "--dsn", supa_dsn, "--supabase"]) == 0
    capsys.readouterr()
    return supa_dsn


@contextmanager
def as_role(dsn: str, role: str, user: uuid.UUID | None = None) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A connection that acts as PostgREST does for a request: SET ROLE and the JWT claims."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        if user is not None:
            claims = json.dumps({"sub": str(user), "role": role})
            conn.execute("SELECT set_config('request.jwt.claims', %s, false)", (claims,))
        yield conn


def submit(conn: psycopg.Connection[dict[str, Any]], **cols: Any) -> dict[str, Any]:
    cols.setdefault("job_type", "doubt")
    cols.setdefault("payload", json.dumps({"question": "Why?"}))
    query = sql.SQL("INSERT INTO jobs ({}) VALUES ({}) RETURNING *").format(
        sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(sql.Placeholder() * len(cols)))
    row = conn.execute(query, list(cols.values())).fetchone()
    assert row is not None
    return row


def owner_insert(dsn: str, user: uuid.UUID | None, n: int = 1, **cols: Any) -> list[uuid.UUID]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return [submit(conn, user_id=user, **cols)["id"] for _ in range(n)]


# -- applying and rolling back -----------------------------------------------------------------


def test_applies_reruns_and_rolls_back_to_the_same_catalog(
    supa_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = catalog(supa_dsn)
    # Supabase's default privileges gave anon everything on the reactor's public objects
    assert ("security", "acl public.jobs kind=v anon SELECT") in before

    assert main(["migrate", "--dsn", supa_dsn, "--supabase"]) == 0
    assert capsys.readouterr().out.splitlines() == ["schema is up to date", "applied supabase (optional)"]
    after = catalog(supa_dsn)
    added = after - before
    for expected in [
        ("pg_class", "reactor.supabase_settings kind=r"),
        ("security", "rls reactor.jobs t f"),
        ("security", "rls reactor.events t f"),
        ("security", "default reactor.jobs.user_id = auth.uid()"),
        ("security", "acl reactor.jobs.user_id authenticated INSERT"),
    ]:
        assert expected in added, expected
    anon = sorted(name for _, name in after if name.startswith("acl ") and " anon " in name)
    assert anon == ["acl schema auth anon USAGE", "acl schema public anon USAGE"]  # Supabase's own
    # schedules are never the users' (migration 0011 revoked what the default privileges gave them)
    assert not [n for _, n in before | after if n.startswith("acl public.job_schedules ")
                and (" anon " in n or " authenticated " in n)]
    assert ("security", "acl public.job_schedules kind=r service_role INSERT") in after
    with psycopg.connect(supa_dsn, autocommit=True) as conn:
        assert 1001 in applied_versions(conn)

    # a second run changes nothing, and plain `migrate` is content with the optional version
    with_oids = snapshot(supa_dsn, with_oids=True)
    assert main(["migrate", "--dsn", supa_dsn, "--supabase"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "supabase (optional) is applied already"
    assert main(["migrate", "--dsn", supa_dsn]) == 0
    assert capsys.readouterr().out.strip() == "schema is up to date"
    assert snapshot(supa_dsn, with_oids=True) == with_oids and catalog(supa_dsn) == after

    assert main(["migrate", "--dsn", supa_dsn, "--down", "--supabase"]) == 0
    assert capsys.readouterr().out.strip() == "rolled back supabase (optional)"
    restored = catalog(supa_dsn)
    assert restored == before, {"left behind": sorted(restored - before), "missing": sorted(before - restored)}
    with psycopg.connect(supa_dsn, autocommit=True) as conn:
        assert 1001 not in applied_versions(conn)
    assert main(["migrate", "--dsn", supa_dsn, "--down", "--supabase"]) == 0
    assert "not applied" in capsys.readouterr().out

    # and again, to show the cycle repeats
    assert main(["migrate", "--dsn", supa_dsn, "--supabase"]) == 0
    assert catalog(supa_dsn) == after


@pytest.mark.parametrize("version", [12, 13, 14, 15, 16, 17, 18])
def test_a_migration_over_the_hardening_is_the_hardening_over_it_and_rolls_back_to_it(
    pg_server: EmbeddedPostgres, supabase_roles: None, version: int
) -> None:
    # 0012 replaces sequence_commit(), 0013 functions the hardening made SECURITY DEFINER and
    # get_queue_stats(), whose privileges it set: upgrading a hardened database must end where
    # hardening an upgraded one does, and rolling back must end at the hardened version before
    before_it = [m for m in discover() if m.version < version]
    upto_it = [m for m in discover() if m.version <= version]
    with _database(pg_server, SUPABASE_DEFAULT_PRIVILEGES, AUTH_SCHEMA) as upgraded, \
            _database(pg_server, SUPABASE_DEFAULT_PRIVILEGES, AUTH_SCHEMA) as fresh:
        migrate_up(upgraded, before_it)
        migrate_optional_up(upgraded, "supabase")
        hardened_before = catalog(upgraded) | definitions(upgraded)
        migrate_up(upgraded, upto_it)
        migrate_up(fresh, upto_it)
        migrate_optional_up(fresh, "supabase")
        a, b = catalog(upgraded) | definitions(upgraded), catalog(fresh) | definitions(fresh)
        assert a == b, {"upgraded only": sorted(a - b), "fresh only": sorted(b - a)}
        migrate_down(upgraded, to_version=version - 1)
        back = catalog(upgraded) | definitions(upgraded)
        assert back == hardened_before, {"left behind": sorted(back - hardened_before),
                                         "missing": sorted(hardened_before - back)}


def test_general_down_removes_the_hardening_first(hardened: str, capsys: pytest.CaptureFixture[str]) -> None:
    owner_insert(hardened, uuid.uuid4())
    assert main(["migrate", "--dsn", hardened, "--down"]) == 0
    assert capsys.readouterr().out.splitlines() == ["rolled back 1001_supabase"] + [
        f"rolled back {m.version:04d}_{m.name}" for m in reversed(discover())]
    with psycopg.connect(hardened, autocommit=True) as conn:
        assert conn.execute("SELECT to_regnamespace('reactor')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM pg_policies").fetchone() == (0,)


def test_psql_applies_and_rolls_back_the_files_too(supa_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = catalog(supa_dsn)
    for path in (SUPABASE, SUPABASE_DOWN, SUPABASE):
        proc = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", str(path), supa_dsn],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
    with psycopg.connect(supa_dsn, autocommit=True) as conn:
        assert applied_versions(conn)[1001] is None  # recorded by the file, without a checksum
    assert main(["migrate", "--dsn", supa_dsn, "--supabase"]) == 0  # records the checksum
    assert "applied already" in capsys.readouterr().out
    assert main(["migrate", "--dsn", supa_dsn, "--down", "--supabase"]) == 0
    assert catalog(supa_dsn) == before


def test_refused_without_supabase_roles_while_plain_migrate_works(
    pg_server: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        found = admin.execute("SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", (list(ROLES),)).fetchone()
    assert found == (0,), "another test left the Supabase roles behind"
    with _database(pg_server) as dsn:
        assert main(["migrate", "--dsn", dsn]) == 0
        assert "applied 0001_jobs" in capsys.readouterr().out
        before = catalog(dsn)

        assert main(["migrate", "--dsn", dsn, "--supabase"]) == 2
        out, err = capsys.readouterr()
        assert "schema is up to date" in out
        assert ("this database lacks: anon, authenticated, service_role, function auth.uid() "
                "(apply it only to a Supabase database") in err
        assert catalog(dsn) == before
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert sorted(applied_versions(conn)) == [m.version for m in discover()]

        # the rest of the commands do not care
        assert main(["status", "--dsn", dsn]) == 0
        assert main(["config", "show", "--dsn", dsn]) == 0


def test_optional_files_ship_in_the_wheel() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["reactor.sql"]
    root = sql_dir()
    for path in root.rglob("*.sql"):
        assert any(path.relative_to(root).match(p) for p in patterns), f"{path} is not in the wheel"


# -- what users may do -------------------------------------------------------------------------


def test_user_inserts_only_for_self_only_queued_and_not_high(hardened: str) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    with as_role(hardened, "authenticated", alice) as conn:
        job = submit(conn)  # user_id and status left out: alice's, queued
        assert (job["user_id"], job["status"], job["priority"]) == (alice, "queued", "medium")
        assert job["queue_position"] == 1
        assert submit(conn, user_id=alice, status="queued", priority="low")["user_id"] == alice

        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"jobs\.user_id must be your own user id"):
            submit(conn, user_id=bob)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"jobs\.user_id must be your own"):
            submit(conn, user_id=None)
        with pytest.raises(psycopg.errors.InsufficientPrivilege,
                           match=r"jobs\.status must be queued when you submit a job, got 'processing'"):
            submit(conn, status="processing")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"got 'completed'"):
            submit(conn, status="completed")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"jobs\.priority high is reserved"):
            submit(conn, priority="high")
        # columns that are the reactor's to set
        for col, value in [("renderer", "revideo"), ("max_retries", 99), ("created_at", "2000-01-01"),
                           ("locked_by", "me"), ("run_after", "2000-01-01")]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                submit(conn, **{col: value})
        # no updates or deletes, not even of one's own job
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE jobs SET priority = 'high' WHERE id = %s", (job["id"],))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM jobs WHERE id = %s", (job["id"],))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 100")
        assert conn.execute("SELECT count(*) AS n FROM jobs").fetchone() == {"n": 2}

    with as_role(hardened, "authenticated") as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed in"):  # a role without a user
        submit(conn)

    # an operator allows high priority (reactor config set reaches the optional settings)
    assert main(["--log-level", "WARNING", "config", "set", "--dsn", hardened,
                 "supabase.allow_user_high_priority=true"]) == 0
    with as_role(hardened, "authenticated", alice) as conn:
        assert submit(conn, priority="high")["queue_position"] == 1


def test_user_reads_only_own_jobs_and_events(hardened: str) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    bobs = owner_insert(hardened, bob, 2)
    with as_role(hardened, "authenticated", alice) as conn:
        mine = submit(conn)
        assert mine["queue_position"] == 3  # counted against everyone's queue, not only what alice sees
        assert [r["id"] for r in conn.execute("SELECT id FROM jobs").fetchall()] == [mine["id"]]
        assert conn.execute("SELECT * FROM jobs WHERE id = %s", (bobs[0],)).fetchall() == []
        events = conn.execute("SELECT job_id, kind, user_id FROM job_events ORDER BY seq").fetchall()
        assert events == [{"job_id": mine["id"], "kind": "inserted", "user_id": alice}]
        assert conn.execute("SELECT count(*) AS n FROM job_events WHERE job_id = %s", (bobs[0],)).fetchone() == {
            "n": 0}
        # the internals stay closed
        for table in ("reactor.counters", "reactor.event_stage", "reactor.supabase_settings",
                      "reactor.paused_limits", "job_queue_config"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT * FROM {table}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM reactor.claim_jobs('me', 10, interval '1 minute')")
        stats = conn.execute("SELECT queued FROM get_queue_stats()").fetchone()
        assert stats == {"queued": 3}
        types = conn.execute("SELECT name FROM job_types ORDER BY name").fetchall()
        assert [t["name"] for t in types] == ["daily_ca", "doubt", "topic_short"]


def test_user_positions_count_everyone_at_any_depth(hardened: str) -> None:
    """A user sees only their own jobs, numbered against everyone's queue, deep in it too (0010)."""
    alice, bob = uuid.uuid4(), uuid.uuid4()
    bulk = ("INSERT INTO jobs (job_type, priority, user_id, payload) SELECT 'topic_short', %s, %s, "
            "'{\"topic\": \"t\"}' FROM generate_series(1, %s)")
    with psycopg.connect(hardened, autocommit=True) as owner:
        owner.execute(bulk, ("medium", bob, 300))
        owner.execute(bulk, ("low", bob, 200))
        with as_role(hardened, "authenticated", alice) as conn:
            first = submit(conn)
            assert first["queue_position"] == 301
        owner.execute(bulk, ("medium", bob, 150))
        owner.execute(bulk, ("high", bob, 100))
        owner.execute("UPDATE jobs SET created_at = now() - interval '1 hour' WHERE id IN "
                      "(SELECT id FROM reactor.jobs WHERE priority = 'medium' ORDER BY job_no LIMIT 1 OFFSET 150)")
        with as_role(hardened, "authenticated", alice) as conn:
            second = submit(conn, priority="low")
            assert second["queue_position"] == 100 + 451 + 201
            mine = conn.execute("SELECT id, queue_position FROM jobs ORDER BY queue_position").fetchall()
        want: dict[uuid.UUID, int] = dict(owner.execute(
            "SELECT id, row_number() OVER (ORDER BY priority_rank, created_at, job_no) "
            "FROM reactor.jobs WHERE status = 'queued'").fetchall())
    assert [(r["id"], r["queue_position"]) for r in mine] == [(first["id"], 100 + 1 + 300),
                                                              (second["id"], 100 + 451 + 201)]
    assert all(want[r["id"]] == r["queue_position"] for r in mine)


def test_rate_limit_per_user(hardened: str) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(hardened, autocommit=True) as owner:
        owner.execute("UPDATE reactor.supabase_settings SET user_jobs_per_minute = 3")
    with as_role(hardened, "authenticated", alice) as conn:
        conn.execute("INSERT INTO jobs (job_type, payload) VALUES ('doubt', '{\"question\": \"a\"}'), "
                     "('doubt', '{\"question\": \"b\"}')")
        submit(conn)
        with pytest.raises(psycopg.Error, match=r"too many jobs: at most 3 per minute per user, and you "
                                                r"submitted 3 in the last minute") as exc:
            submit(conn)
        assert exc.value.sqlstate == "PT429"  # PostgREST answers 429 Too Many Requests
        assert exc.value.diag.message_hint is not None and exc.value.diag.message_hint.startswith("try again in")
    with as_role(hardened, "authenticated", bob) as conn:
        with pytest.raises(psycopg.Error, match="too many jobs") as exc:  # a batch past the limit: none of it
            conn.execute("INSERT INTO jobs (job_type, payload) SELECT 'doubt', '{\"question\": \"q\"}' "
                         "FROM generate_series(1, 4)")
        assert conn.execute("SELECT count(*) AS n FROM jobs").fetchone() == {"n": 0}
        submit(conn)  # bob has his own allowance
    with psycopg.connect(hardened, autocommit=True) as owner:  # a minute later
        owner.execute("UPDATE reactor.jobs SET created_at = created_at - interval '61 seconds' WHERE user_id = %s",
                      (alice,))
    with as_role(hardened, "authenticated", alice) as conn:
        submit(conn)
    with psycopg.connect(hardened, autocommit=True) as owner:
        owner.execute("UPDATE reactor.supabase_settings SET user_jobs_per_minute = 0")
    with as_role(hardened, "authenticated", bob) as conn:
        with pytest.raises(psycopg.Error, match="at most 0 per minute") as exc:
            submit(conn)
        assert exc.value.diag.message_hint == "submissions by users are switched off"


def test_rate_limit_holds_for_concurrent_transactions(hardened: str) -> None:
    alice = uuid.uuid4()
    with psycopg.connect(hardened, autocommit=True) as owner:
        owner.execute("UPDATE reactor.supabase_settings SET user_jobs_per_minute = 2")
    outcome: list[BaseException | None] = []
    with as_role(hardened, "authenticated", alice) as first, as_role(hardened, "authenticated", alice) as second:
        with first.transaction():
            submit(first)
            submit(first)

            def late() -> None:  # waits for the first transaction, then counts its rows
                try:
                    submit(second)
                    outcome.append(None)
                except psycopg.Error as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=late)
            thread.start()
            thread.join(0.5)
            assert thread.is_alive(), "the second insert should wait for the first transaction"
        thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.Error)
    assert "too many jobs" in str(outcome[0])


# -- service_role, anon, and the reactor itself -------------------------------------------------


def test_service_role_is_unrestricted(hardened: str) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    owner_insert(hardened, alice)
    with as_role(hardened, "service_role") as conn:
        for _ in range(12):  # past any user's rate, for someone else, high, and not queued
            submit(conn, user_id=bob, priority="high")
        processing = submit(conn, user_id=bob, status="processing", renderer="revideo", max_retries=0)
        assert processing["status"] == "processing"
        assert conn.execute("SELECT count(*) AS n FROM jobs").fetchone() == {"n": 14}
        assert conn.execute("SELECT count(DISTINCT user_id) AS n FROM job_events").fetchone() == {"n": 2}
        conn.execute("UPDATE jobs SET status = 'cancelled' WHERE user_id = %s AND status = 'queued'", (alice,))
        conn.execute("DELETE FROM jobs WHERE id = %s", (processing["id"],))
        conn.execute("INSERT INTO job_types (name, renderer, input_field) VALUES ('exam_recap', 'manim', 'chapter')")
        conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # remembered for resume
        stats = conn.execute("SELECT queued, cancelled, paused FROM get_queue_stats()").fetchone()
        assert stats == {"queued": 12, "cancelled": 1, "paused": True}
    with psycopg.connect(hardened, autocommit=True) as owner:
        assert owner.execute("SELECT max_concurrent_renders FROM reactor.paused_limits").fetchone() == (10,)
        kinds = owner.execute("SELECT kind FROM reactor.events WHERE job_id = %s ORDER BY seq",
                              (processing["id"],)).fetchall()
        assert [k[0] for k in kinds] == ["inserted", "deleted"]


def test_anon_gets_nothing(hardened: str) -> None:
    job_id = owner_insert(hardened, uuid.uuid4())[0]
    with as_role(hardened, "anon") as conn:
        for statement in [
            "SELECT * FROM jobs",
            "SELECT * FROM job_events",
            "SELECT * FROM job_types",
            "SELECT * FROM job_queue_config",
            "SELECT * FROM get_queue_stats()",
            "SELECT update_queue_positions()",
            "SELECT * FROM reactor.jobs",
            "INSERT INTO jobs (job_type, payload) VALUES ('doubt', '{\"question\": \"q\"}')",
            f"UPDATE jobs SET status = 'cancelled' WHERE id = '{job_id}'",
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_the_reactor_still_sees_and_runs_every_job(hardened: str) -> None:
    alice = uuid.uuid4()
    with psycopg.connect(hardened, autocommit=True) as listener:
        listener.execute("LISTEN reactor_events")
        with as_role(hardened, "authenticated", alice) as conn:
            job = submit(conn)
        notes = list(listener.notifies(timeout=5, stop_after=1))
        assert notes and json.loads(notes[0].payload)["id"] == str(job["id"])
    with psycopg.connect(hardened, autocommit=True) as owner:  # the reactor connects as the owner
        claimed = owner.execute("SELECT id, user_id FROM reactor.claim_jobs('r-1', 10, interval '15 seconds')")
        assert claimed.fetchall() == [(job["id"], alice)]
        counters = owner.execute("SELECT queued, processing FROM reactor.counters").fetchone()
        assert counters == (0, 1)
    with as_role(hardened, "authenticated", alice) as conn:
        seen = conn.execute("SELECT status, locked_by FROM jobs").fetchone()
        assert seen == {"status": "processing", "locked_by": "r-1"}
        kinds = conn.execute("SELECT kind, actor FROM job_events ORDER BY seq").fetchall()
        assert [k["kind"] for k in kinds] == ["inserted", "started"]
