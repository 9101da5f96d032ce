"""Retention (migration 0013): finished jobs past job_queue_config.job_retention are deleted with
their events, in batches, by the sweep and by ``reactor prune``; queued and processing jobs never."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from reactor.cli.main import main
from reactor.db.store import Database
from tests.integration.test_events_notify import COUNTS, counters, one

Conn = psycopg.Connection[Any]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def seed(db: Conn) -> dict[str, list[Any]]:
    """Old finished jobs of every kind, recent finished ones, and old live ones."""
    ids: dict[str, list[Any]] = {}
    for name, status, age in [("old_completed", "completed", "40 days"), ("old_failed", "failed", "31 days"),
                              ("old_cancelled", "cancelled", "90 days"), ("recent", "completed", "29 days"),
                              ("old_queued", "queued", "60 days"), ("old_processing", "processing", "60 days")]:
        rows = db.execute(
            "INSERT INTO jobs (job_type, payload, status, created_at, completed_at) "
            "SELECT 'doubt', jsonb_build_object('question', 'q' || g), %s, now() - %s::interval - interval '1 hour', "
            "       CASE WHEN %s IN ('completed', 'failed', 'cancelled') THEN now() - %s::interval END "
            "FROM generate_series(1, 3) g RETURNING id", (status, age, status, age)).fetchall()
        ids[name] = [r[0] for r in rows]
    return ids


def events_of(db: Conn, ids: list[Any]) -> int:
    row = db.execute("SELECT count(*) FROM job_events WHERE job_id = ANY(%s)", (ids,)).fetchone()
    assert row
    return int(row[0])


def test_prune_deletes_old_finished_jobs_with_their_events_in_batches(db: Conn) -> None:
    ids = seed(db)
    old = ids["old_completed"] + ids["old_failed"] + ids["old_cancelled"]
    assert events_of(db, old) == 9
    seq = one(db, "SELECT last_seq FROM reactor.counters")["last_seq"]

    first = one(db, "SELECT * FROM reactor.prune_jobs(4)")
    assert (first["jobs_pruned"], first["events_pruned"]) == (4, 4)
    rest = one(db, "SELECT * FROM reactor.prune_jobs(100, %s)", (first["last_completed_at"],))
    assert (rest["jobs_pruned"], rest["events_pruned"]) == (5, 5)
    assert one(db, "SELECT * FROM reactor.prune_jobs(100)")["jobs_pruned"] == 0

    left = {r[0] for r in db.execute("SELECT id FROM reactor.jobs")}
    assert left == set(ids["recent"] + ids["old_queued"] + ids["old_processing"])
    assert events_of(db, old) == 0
    assert events_of(db, list(left)) == 9
    assert counters(db) == one(db, COUNTS)  # the totals dropped by what went
    assert one(db, "SELECT last_seq FROM reactor.counters")["last_seq"] == seq  # nobody's event

    db.execute("UPDATE job_queue_config SET job_retention = '1 day'")
    assert one(db, "SELECT * FROM reactor.prune_jobs()")["jobs_pruned"] == 3
    with pytest.raises(psycopg.errors.CheckViolation, match="job_retention must be at least 1 minute"):
        db.execute("UPDATE job_queue_config SET job_retention = '10 seconds'")


def test_prune_skips_a_job_someone_holds(dsn: str, db: Conn) -> None:
    ids = seed(db)
    with psycopg.connect(dsn) as other:
        other.execute("SELECT 1 FROM reactor.jobs WHERE id = %s FOR UPDATE", (ids["old_failed"][0],))
        assert one(db, "SELECT * FROM reactor.prune_jobs()")["jobs_pruned"] == 8
    assert one(db, "SELECT * FROM reactor.prune_jobs()")["jobs_pruned"] == 1


@pytest.mark.anyio
async def test_the_sweep_prunes(dsn: str, db: Conn) -> None:
    seed(db)
    database = Database(dsn, "retention")
    database.PRUNE_BATCH = 2
    await database.open()
    try:
        _, wakeups = await database.sweep(30.0, 30.0)
    finally:
        await database.close()
    assert wakeups["jobs_pruned"] == 9
    assert one(db, "SELECT count(*) AS n FROM reactor.jobs")["n"] == 9


def test_reactor_prune_dry_run_then_prune(dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    seed(db)
    assert main(["--log-level", "WARNING", "prune", "--dsn", dsn, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would go   9 jobs (3 completed, 3 failed, 3 cancelled) and 9 events" in out, out
    assert one(db, "SELECT count(*) AS n FROM reactor.jobs")["n"] == 18

    assert main(["--log-level", "WARNING", "prune", "--dsn", dsn, "--batch", "4", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert (done["jobs_pruned"], done["events_pruned"], done["batches"]) == (9, 9, 3)
    assert one(db, "SELECT count(*) AS n FROM reactor.jobs")["n"] == 9
