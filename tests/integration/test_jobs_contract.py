"""The SQL contract of jobs and job_queue_config: defaults, validation, queue positions."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg.rows import dict_row

Conn = psycopg.Connection[object]


def rows(conn: Conn, query: LiteralString, params: tuple[Any, ...] | None = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def one(conn: Conn, query: LiteralString, params: tuple[Any, ...] | None = None) -> dict[str, Any]:
    found = rows(conn, query, params)
    assert len(found) == 1, found
    return found[0]


def add_job(conn: Conn, job_type: str = "doubt", priority: str | None = None) -> dict[str, Any]:
    if priority is None:
        return one(conn, "INSERT INTO jobs (job_type) VALUES (%s) RETURNING *", (job_type,))
    return one(
        conn,
        "INSERT INTO jobs (job_type, priority) VALUES (%s, %s) RETURNING *",
        (job_type, priority),
    )


def queue(conn: Conn) -> list[tuple[uuid.UUID, str, int]]:
    """Queued jobs as (id, priority, position), in position order."""
    return [
        (r["id"], r["priority"], r["queue_position"])
        for r in rows(
            conn,
            "SELECT id, priority, queue_position FROM jobs WHERE status = 'queued' "
            "ORDER BY queue_position",
        )
    ]


def state(conn: Conn) -> dict[str, Any]:
    """Everything a refused write must leave as it was."""
    return {
        "jobs": rows(conn, "SELECT to_jsonb(j) AS j FROM reactor.jobs j ORDER BY job_no"),
        "counters": one(conn, "SELECT * FROM reactor.counters"),
        "events": one(conn, "SELECT count(*) AS n, max(seq) AS last FROM reactor.events"),
        "staged": one(conn, "SELECT count(*) AS n FROM reactor.event_stage"),
        "config": one(conn, "SELECT to_jsonb(c) AS c FROM job_queue_config c"),
    }


# -- job_queue_config -----------------------------------------------------------------------------


def test_config_defaults(db: Conn) -> None:
    cfg = rows(db, "SELECT * FROM job_queue_config")
    assert len(cfg) == 1
    row = cfg[0]
    assert row["max_concurrent_renders"] == 10
    assert row["max_manim_renders"] == 4
    assert row["job_timeout_minutes"] == 10
    assert row["peak_hour_start"] is None
    assert row["peak_hour_end"] is None
    assert row["peak_worker_multiplier"] == Decimal("1.0")
    assert row["alert_queue_depth"] == 50
    assert row["alert_failed_per_hour"] == 10
    assert row["alert_avg_wait_minutes"] == 15
    assert row["timezone"] == "UTC"


BAD_CONFIG: list[tuple[LiteralString, str]] = [
    ("UPDATE job_queue_config SET max_concurrent_renders = -1", "max_concurrent_renders"),
    ("UPDATE job_queue_config SET max_concurrent_renders = NULL", "max_concurrent_renders"),
    ("UPDATE job_queue_config SET max_manim_renders = -1", "max_manim_renders"),
    ("UPDATE job_queue_config SET job_timeout_minutes = -1", "job_timeout_minutes"),
    ("UPDATE job_queue_config SET job_timeout_minutes = 0", "job_timeout_minutes"),
    ("UPDATE job_queue_config SET alert_queue_depth = -1", "alert_queue_depth"),
    ("UPDATE job_queue_config SET alert_failed_per_hour = -1", "alert_failed_per_hour"),
    ("UPDATE job_queue_config SET alert_avg_wait_minutes = -1", "alert_avg_wait_minutes"),
    ("UPDATE job_queue_config SET peak_worker_multiplier = 0", "peak_worker_multiplier"),
    ("UPDATE job_queue_config SET peak_worker_multiplier = -0.5", "peak_worker_multiplier"),
    # setting one end of the peak alone: the error names the end still missing
    ("UPDATE job_queue_config SET peak_hour_start = '08:00'", "peak_hour_end"),
    ("UPDATE job_queue_config SET peak_hour_end = '20:00'", "peak_hour_start"),
    ("UPDATE job_queue_config SET timezone = 'Mars/Olympus_Mons'", "timezone"),
    ("UPDATE job_queue_config SET id = false", "id"),
]


def test_bad_config_values_are_refused_naming_the_column(db: Conn) -> None:
    for statement, column in BAD_CONFIG:
        before = state(db)
        with pytest.raises(psycopg.Error) as info:
            db.execute(statement)
        err = info.value
        message = err.diag.message_primary or ""
        assert message.startswith("job_queue_config."), (statement, message)
        assert re.search(rf"\b{column}\b", message), (statement, message)
        assert err.diag.column_name == column, statement
        assert state(db) == before, statement


def test_config_keeps_exactly_one_row(db: Conn) -> None:
    for statement in [
        "INSERT INTO job_queue_config DEFAULT VALUES",
        "INSERT INTO job_queue_config (id) VALUES (false)",
        "DELETE FROM job_queue_config",
    ]:
        before = state(db)
        with pytest.raises(psycopg.Error) as info:
            db.execute(statement)
        assert "job_queue_config" in str(info.value), statement
        assert "one row" in str(info.value), statement
        assert state(db) == before, statement
    assert one(db, "SELECT count(*) AS n FROM job_queue_config")["n"] == 1


def test_good_config_update_is_accepted(db: Conn) -> None:
    # the refusals above are about the values, not about updating at all
    db.execute(
        "UPDATE job_queue_config SET max_concurrent_renders = 0, peak_hour_start = '22:00', "
        "peak_hour_end = '06:00', peak_worker_multiplier = 1.5, timezone = 'Asia/Kolkata'"
    )
    row = one(db, "SELECT * FROM job_queue_config")
    assert row["max_concurrent_renders"] == 0
    assert row["timezone"] == "Asia/Kolkata"


# -- job defaults and types -----------------------------------------------------------------------


def test_job_defaults(db: Conn) -> None:
    job = one(db, "INSERT INTO jobs (job_type, payload) VALUES ('doubt', '{\"question\": \"q\"}') RETURNING *")
    assert job["priority"] == "medium"
    assert job["status"] == "queued"
    assert job["retry_count"] == 0
    assert job["max_retries"] == 3
    assert isinstance(job["id"], uuid.UUID)
    assert job["queue_position"] == 1
    assert job["payload"] == {"question": "q"}
    assert job["started_at"] is None
    assert job["completed_at"] is None
    assert job["created_at"] is not None
    other = add_job(db)
    assert other["id"] != job["id"]
    assert other["queue_position"] == 2


@pytest.mark.parametrize(
    ("job_type", "renderer"),
    [("doubt", "manim"), ("topic_short", "revideo"), ("daily_ca", "revideo")],
)
def test_renderer_comes_from_job_types(db: Conn, job_type: str, renderer: str) -> None:
    assert add_job(db, job_type)["renderer"] == renderer


def test_operator_added_job_type(db: Conn) -> None:
    db.execute(
        "INSERT INTO job_types (name, renderer, input_field) VALUES ('quiz', 'quizgen', 'topic')"
    )
    job = one(db, "INSERT INTO jobs (job_type, payload) VALUES ('quiz', '{\"topic\": \"t\"}') RETURNING *")
    assert job["renderer"] == "quizgen"
    assert job["status"] == "queued"
    assert job["queue_position"] == 1


# -- queue positions ------------------------------------------------------------------------------


def test_priority_order_and_contiguous_positions(db: Conn) -> None:
    low = add_job(db, "doubt", "low")
    high = add_job(db, "topic_short", "high")
    medium = add_job(db, "doubt", "medium")
    assert queue(db) == [
        (high["id"], "high", 1),
        (medium["id"], "medium", 2),
        (low["id"], "low", 3),
    ]
    # a mix of renderers (both halves of the claim index) and priorities, inserted shuffled
    for job_type, priority in [
        ("daily_ca", "low"), ("doubt", "high"), ("topic_short", "medium"), ("doubt", "low"),
        ("topic_short", "high"), ("doubt", "medium"),
    ]:
        add_job(db, job_type, priority)
    q = queue(db)
    assert [pos for _, _, pos in q] == list(range(1, len(q) + 1))
    rank = {"high": 0, "medium": 1, "low": 2}
    assert [rank[p] for _, p, _ in q] == sorted(rank[p] for _, p, _ in q)


def test_fifo_within_a_priority(db: Conn) -> None:
    ids = [add_job(db, jt, "medium")["id"] for jt in ("doubt", "topic_short", "doubt", "daily_ca")]
    # several rows in one statement share created_at: insertion order breaks the tie
    batch = [
        r["id"]
        for r in rows(
            db,
            "INSERT INTO jobs (job_type, priority) "
            "VALUES ('doubt', 'medium'), ('topic_short', 'medium'), ('doubt', 'medium') RETURNING id",
        )
    ]
    q = queue(db)
    assert [i for i, _, _ in q] == ids + batch
    assert [pos for _, _, pos in q] == list(range(1, len(q) + 1))


def test_positions_shift_when_a_job_ahead_starts(db: Conn) -> None:
    first = add_job(db, "doubt", "high")
    second = add_job(db, "topic_short", "high")
    third = add_job(db, "doubt", "low")
    assert [(i, p) for i, _, p in queue(db)] == [(first["id"], 1), (second["id"], 2), (third["id"], 3)]

    db.execute("UPDATE jobs SET status = 'processing' WHERE id = %s", (first["id"],))
    assert [(i, p) for i, _, p in queue(db)] == [(second["id"], 1), (third["id"], 2)]
    started = one(db, "SELECT status, queue_position FROM jobs WHERE id = %s", (first["id"],))
    assert started == {"status": "processing", "queue_position": None}

    for status in ("completed", "failed", "cancelled"):
        db.execute("UPDATE jobs SET status = %s WHERE id = %s", (status, second["id"]))
        row = one(db, "SELECT queue_position FROM jobs WHERE id = %s", (second["id"],))
        assert row["queue_position"] is None
    assert [(i, p) for i, _, p in queue(db)] == [(third["id"], 1)]

    # back in the queue: it takes its place by priority and age again
    db.execute("UPDATE jobs SET status = 'queued' WHERE id = %s", (first["id"],))
    assert [(i, p) for i, _, p in queue(db)] == [(first["id"], 1), (third["id"], 2)]


def _xmins(conn: Conn) -> dict[uuid.UUID, str]:
    return {r["id"]: r["x"] for r in rows(conn, "SELECT id, xmin::text AS x FROM reactor.jobs")}


def test_enqueue_and_dequeue_rewrite_no_other_row(db: Conn) -> None:
    for priority in ("low", "medium", "high", "medium", "low"):
        add_job(db, "doubt", priority)
    before = _xmins(db)

    new = add_job(db, "topic_short", "high")
    after_insert = _xmins(db)
    assert after_insert.pop(new["id"]) not in before.values()
    assert after_insert == before

    before = _xmins(db)
    head = queue(db)[0][0]
    db.execute("UPDATE jobs SET status = 'processing' WHERE id = %s", (head,))
    after_dequeue = _xmins(db)
    assert after_dequeue.pop(head) != before.pop(head)
    assert after_dequeue == before


# -- refused writes -------------------------------------------------------------------------------

BAD_INSERTS: list[tuple[str, LiteralString]] = [
    ("priority", "INSERT INTO jobs (job_type, priority) VALUES ('doubt', 'urgent')"),
    ("status", "INSERT INTO jobs (job_type, status) VALUES ('doubt', 'pending')"),
    ("job_type", "INSERT INTO jobs (job_type) VALUES ('no_such_type')"),
    ("job_type", "INSERT INTO jobs (payload) VALUES ('{}')"),
    ("payload", "INSERT INTO jobs (job_type, payload) VALUES ('doubt', '[1, 2]')"),
    ("payload", "INSERT INTO jobs (job_type, payload) VALUES ('doubt', '\"a string\"')"),
    ("payload", "INSERT INTO jobs (job_type, payload) VALUES ('doubt', '42')"),
    ("payload", "INSERT INTO jobs (job_type, payload) VALUES ('doubt', NULL)"),
    # one bad row refuses the whole statement
    (
        "priority",
        "INSERT INTO jobs (job_type, priority) VALUES ('doubt', 'high'), ('doubt', 'urgent')",
    ),
]

BAD_UPDATES: list[tuple[str, LiteralString]] = [
    ("priority", "UPDATE jobs SET priority = 'urgent'"),
    ("status", "UPDATE jobs SET status = 'pending'"),
    ("job_type", "UPDATE jobs SET job_type = 'no_such_type'"),
    ("payload", "UPDATE jobs SET payload = '[1, 2]'"),
    ("payload", "UPDATE jobs SET payload = '\"a string\"'"),
    ("payload", "UPDATE jobs SET payload = '42'"),
]


def test_bad_writes_are_refused_naming_the_column(db: Conn) -> None:
    add_job(db, "doubt", "low")  # so that counters, events and positions have something to lose
    add_job(db, "topic_short", "high")
    for column, statement in BAD_INSERTS + BAD_UPDATES:
        before = state(db)
        with pytest.raises(psycopg.Error) as info:
            db.execute(statement)
        err = info.value
        assert err.diag.column_name == column, statement
        assert f"jobs.{column}" in (err.diag.message_primary or ""), statement
        assert state(db) == before, statement
    # and the same statements with good values do go through
    db.execute("UPDATE jobs SET priority = 'medium', payload = '{\"k\": 1}'")
    assert [p for _, p, _ in queue(db)] == ["medium", "medium"]


# -- timestamps on status changes -----------------------------------------------------------------


def test_status_transitions_set_timestamps(db: Conn) -> None:
    job = add_job(db)
    jid = job["id"]

    started = one(
        db, "UPDATE jobs SET status = 'processing' WHERE id = %s RETURNING *, now() AS now", (jid,)
    )
    assert started["started_at"] == started["now"]
    assert started["completed_at"] is None

    done = one(
        db, "UPDATE jobs SET status = 'completed' WHERE id = %s RETURNING *, now() AS now", (jid,)
    )
    assert done["completed_at"] == done["now"]
    assert done["started_at"] == started["started_at"]
    assert done["completed_at"] >= done["started_at"]

    # requeued: completed_at cleared; started again: a new started_at
    requeued = one(db, "UPDATE jobs SET status = 'queued' WHERE id = %s RETURNING *", (jid,))
    assert requeued["completed_at"] is None
    again = one(
        db, "UPDATE jobs SET status = 'processing' WHERE id = %s RETURNING *, now() AS now", (jid,)
    )
    assert again["started_at"] == again["now"]
    assert again["started_at"] > started["started_at"]

    failed = one(
        db, "UPDATE jobs SET status = 'failed' WHERE id = %s RETURNING *, now() AS now", (jid,)
    )
    assert failed["completed_at"] == failed["now"]


def test_explicit_started_at_with_processing_is_kept(db: Conn) -> None:
    job = add_job(db)
    row = one(
        db,
        "UPDATE jobs SET status = 'processing', started_at = now() - interval '2 hours' "
        "WHERE id = %s RETURNING started_at, now() AS now",
        (job["id"],),
    )
    assert row["now"] - row["started_at"] == timedelta(hours=2)

    inserted = one(
        db,
        "INSERT INTO jobs (job_type, status, started_at) "
        "VALUES ('doubt', 'processing', now() - interval '5 minutes') RETURNING started_at, now() AS now",
    )
    assert inserted["now"] - inserted["started_at"] == timedelta(minutes=5)


def test_config_row_cannot_be_truncated_away(db: Conn) -> None:
    with pytest.raises(psycopg.Error) as info:
        db.execute("TRUNCATE job_queue_config")
    assert "job_queue_config must keep its one row" in str(info.value)
    assert db.execute("SELECT count(*) FROM job_queue_config").fetchone() == (1,)
