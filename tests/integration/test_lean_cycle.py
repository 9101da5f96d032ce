"""Migration 0018 (lean cycle): the CHECK of reactor.jobs through reactor.jobs_row_check(), and
run_cycle() stamping its own two UPDATEs instead of jobs_before_write.

* The CHECK is a backstop: writers normally meet jobs_before_write first. With the triggers out of
  the way (session_replication_role = replica, as a data-only restore runs) every bad value is still
  refused, with SQLSTATE 23514, the field in ``column_name`` and the constraint's old name.
* The claim and the outcome set what the trigger would have set (started_at, completed_at,
  updated_at, locked_by, lease_expires_at), and the trigger still runs for every other UPDATE,
  including one made later in the transaction that called run_cycle().
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]

CLAIM: LiteralString = ("SELECT id, attempt FROM reactor.run_cycle('[]'::jsonb, 'r1', %s, interval '60 s') "
                        "WHERE NOT written")
FINISH: LiteralString = "SELECT id FROM reactor.run_cycle(%s::jsonb, 'r1', 0, interval '60 s') WHERE written"
ROW: LiteralString = ("SELECT status, started_at, completed_at, updated_at, locked_by, lease_expires_at, "
                      "run_after, now() AS now FROM reactor.jobs WHERE id = %s")

#: a bad value for each column the CHECK covers, and the constraint name the error reports
BAD: list[tuple[str, Any, str]] = [
    ("priority", "urgent", "jobs.priority must be high, medium or low"),
    ("status", "done", "jobs.status must be queued, processing, completed, failed or cancelled"),
    ("payload", Jsonb([1]), "jobs.payload must be a JSON object"),
    ("result", Jsonb("ok"), "jobs.result must be a JSON object"),
    ("retry_count", -1, "jobs.retry_count must be 0 or more"),
    ("max_retries", -2, "jobs.max_retries must be 0 or more"),
    ("error_category", "OOPS", "jobs.error_category is not a known category"),
]


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        c.execute("SET reactor.actor = 'reactor:r1'")
        c.execute("UPDATE job_queue_config SET max_concurrent_renders = 10, max_manim_renders = 10")
        yield c


def claim_one(conn: Conn) -> dict[str, Any]:
    conn.execute("INSERT INTO jobs (job_type, payload) VALUES ('doubt', '{\"question\": \"q\"}')")
    with conn.transaction():
        [got] = conn.execute(CLAIM, (1,)).fetchall()
        row = conn.execute(ROW, (got["id"],)).fetchone()
    assert row is not None
    job: dict[str, Any] = {**got, **row}
    return job


def finish(conn: Conn, job: dict[str, Any], status: str, **extra: Any) -> dict[str, Any]:
    outcome = {"id": str(job["id"]), "attempt": job["attempt"], "status": status, "retry_count": 0,
               "delay_s": 0, **extra}
    with conn.transaction():
        written = conn.execute(FINISH, (json.dumps([outcome]),)).fetchall()
        row = conn.execute(ROW, (job["id"],)).fetchone()
    assert [w["id"] for w in written] == [job["id"]]
    assert row is not None
    out: dict[str, Any] = row
    return out


@pytest.mark.parametrize(("column", "value", "name"), BAD)
def test_the_check_refuses_each_bad_value_naming_the_field_with_the_triggers_bypassed(
    conn: Conn, column: str, value: Any, name: str
) -> None:
    conn.execute("INSERT INTO jobs (job_type) VALUES ('doubt')")
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # no trigger runs
        with pytest.raises(psycopg.errors.CheckViolation) as err, conn.transaction():
            conn.execute(sql.SQL("UPDATE reactor.jobs SET {} = %s").format(sql.Identifier(column)), (value,))
        with pytest.raises(psycopg.errors.CheckViolation) as err2, conn.transaction():
            conn.execute(sql.SQL("INSERT INTO reactor.jobs (job_type, renderer, {}) VALUES ('doubt', 'revideo', %s)")
                         .format(sql.Identifier(column)), (value,))
    for e in (err.value, err2.value):
        assert e.diag.column_name == column
        assert e.diag.constraint_name == name
        assert e.diag.table_name == "jobs"
        assert f'violates check constraint "{name}"' in (e.diag.message_primary or "")


def test_the_check_passes_nulls_and_good_rows_and_refuses_job_no_out_of_range(conn: Conn) -> None:
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("INSERT INTO reactor.jobs (job_type, renderer, result, error_category) "
                     "VALUES ('doubt', 'revideo', NULL, NULL)")
        conn.execute("INSERT INTO reactor.jobs (job_type, renderer, result, error_category, priority, status) "
                     "VALUES ('doubt', 'revideo', '{\"video_url\": \"u\"}', 'TIMEOUT', 'high', 'failed')")
        with pytest.raises(psycopg.errors.CheckViolation, match="job_no must be between 1 and 2") as err, \
                conn.transaction():
            conn.execute("INSERT INTO reactor.jobs (job_type, renderer, job_no) OVERRIDING SYSTEM VALUE "
                         "VALUES ('doubt', 'revideo', 0)")
    assert err.value.diag.column_name == "job_no"


def test_a_claim_stamps_what_the_trigger_would(conn: Conn) -> None:
    job = claim_one(conn)
    assert job["status"] == "processing"
    assert job["started_at"] == job["now"]
    assert job["updated_at"] == job["now"]
    assert job["completed_at"] is None
    assert job["locked_by"] == "r1"
    assert job["lease_expires_at"] == job["now"] + timedelta(seconds=60)


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_an_outcome_that_ends_the_job_stamps_what_the_trigger_would(conn: Conn, status: str) -> None:
    job = claim_one(conn)
    extra = {"result": {"video_url": "https://v/1.mp4"}} if status == "completed" else {}
    row = finish(conn, job, status, **extra)
    assert row["status"] == status
    assert row["completed_at"] == row["now"]
    assert row["updated_at"] == row["now"]
    assert row["started_at"] == job["started_at"]
    assert row["locked_by"] is None and row["lease_expires_at"] is None


def test_a_retry_stamps_what_the_trigger_would(conn: Conn) -> None:
    job = claim_one(conn)
    row = finish(conn, job, "queued", delay_s=30, error_category="API_ERROR", error_message="503")
    assert row["status"] == "queued"
    assert row["completed_at"] is None
    assert row["updated_at"] == row["now"]
    assert row["run_after"] == row["now"] + timedelta(seconds=30)
    assert row["locked_by"] is None and row["lease_expires_at"] is None


def test_the_trigger_runs_for_an_update_after_run_cycle_in_the_same_transaction(conn: Conn) -> None:
    job = claim_one(conn)
    conn.execute("INSERT INTO jobs (job_type) VALUES ('doubt')")
    with pytest.raises(psycopg.errors.CheckViolation) as err, conn.transaction():
        conn.execute(CLAIM, (1,)).fetchall()
        conn.execute("UPDATE jobs SET priority = 'urgent' WHERE id = %s", (job["id"],))
    # the trigger's message (", got ..."), not the CHECK's: the trigger ran
    assert "jobs.priority must be high, medium or low, got 'urgent'" in (err.value.diag.message_primary or "")
    with conn.transaction():
        conn.execute(CLAIM, (1,)).fetchall()
        row = conn.execute("UPDATE jobs SET status = 'completed' WHERE id = %s "
                           "RETURNING completed_at, locked_by, now() AS now", (job["id"],)).fetchone()
    assert row is not None
    assert row["completed_at"] == row["now"] and row["locked_by"] is None


def test_a_stamped_setting_of_another_transaction_does_not_skip_the_trigger(conn: Conn) -> None:
    job = claim_one(conn)
    with conn.transaction():
        xid = conn.execute("SELECT pg_current_xact_id()::text AS x").fetchone()
    assert xid is not None
    with conn.transaction():
        conn.execute("SELECT set_config('reactor.stamped', %s, true)", (xid["x"],))
        row = conn.execute("UPDATE jobs SET status = 'failed' WHERE id = %s "
                           "RETURNING completed_at, locked_by, now() AS now", (job["id"],)).fetchone()
    assert row is not None
    assert row["completed_at"] == row["now"] and row["locked_by"] is None
