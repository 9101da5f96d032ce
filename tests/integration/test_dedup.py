"""Deduplication (migration 0013): an INSERT whose idempotency_key a live job holds creates nothing
and returns that job, through the public view, one session or fifty at once."""

from __future__ import annotations

import threading
import uuid
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.integration.test_events_notify import COUNTS, counters, one

Conn = psycopg.Connection[Any]

SUBMIT: LiteralString = (
    "INSERT INTO jobs (job_type, payload, idempotency_key) VALUES ('topic_short', %s, %s) "
    "RETURNING id, status, queue_position, idempotency_key, payload"
)


def submit(conn: Conn, key: str | None, topic: str = "Photosynthesis") -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(SUBMIT, (Jsonb({"topic": topic}), key)).fetchone()
    assert row is not None
    return row


def count(conn: Conn, query: LiteralString, params: tuple[Any, ...] = ()) -> int:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def test_a_live_key_returns_the_existing_job_and_creates_nothing(db: Conn) -> None:
    submit(db, None, "ahead")
    first = submit(db, "order-1", "first")
    assert (first["status"], first["queue_position"], first["idempotency_key"]) == ("queued", 2, "order-1")
    behind = submit(db, None, "behind")
    seq = count(db, "SELECT last_seq FROM reactor.counters")

    again = submit(db, "order-1", "something else")
    assert again["id"] == first["id"]
    assert (again["status"], again["queue_position"], again["payload"]) == ("queued", 2, {"topic": "first"})
    assert count(db, "SELECT count(*) FROM reactor.jobs") == 3
    assert count(db, "SELECT last_seq FROM reactor.counters") == seq  # no event, no NOTIFY
    assert count(db, "SELECT queued FROM reactor.counters") == 3

    # processing: the same job, no position
    db.execute("UPDATE jobs SET status = 'processing' WHERE id = %s", (first["id"],))
    running = submit(db, "order-1")
    assert (running["id"], running["status"], running["queue_position"]) == (first["id"], "processing", None)
    assert count(db, "SELECT count(*) FROM jobs WHERE id = %s", (behind["id"],)) == 1

    # finished: the key may be used again, and then that new job is the one returned
    db.execute("UPDATE jobs SET status = 'completed' WHERE id = %s", (first["id"],))
    fresh = submit(db, "order-1", "second round")
    assert fresh["id"] != first["id"] and fresh["status"] == "queued"
    assert submit(db, "order-1")["id"] == fresh["id"]
    assert count(db, "SELECT count(*) FROM jobs WHERE idempotency_key = 'order-1'") == 2

    # the totals still match a recount
    assert counters(db) == one(db, COUNTS)


def test_one_statement_with_repeated_keys_makes_one_job_per_key(db: Conn) -> None:
    with db.cursor(row_factory=dict_row) as cur:
        got = cur.execute(
            "INSERT INTO jobs (job_type, payload, idempotency_key) "
            "SELECT 'doubt', jsonb_build_object('question', 'q' || g), 'k' || (g % 2) "
            "FROM generate_series(1, 6) g RETURNING id, idempotency_key").fetchall()
    ids: dict[str, set[Any]] = {r["idempotency_key"]: set() for r in got}
    for r in got:
        ids[r["idempotency_key"]].add(r["id"])
    assert {k: len(v) for k, v in ids.items()} == {"k0": 1, "k1": 1}
    assert count(db, "SELECT count(*) FROM reactor.jobs") == 2
    assert count(db, "SELECT count(*) FROM job_events") == 2


def test_fifty_sessions_at_once_get_one_job(dsn: str, db: Conn) -> None:
    n = 50
    key = f"burst-{uuid.uuid4()}"
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(n)]
    barrier = threading.Barrier(n)
    got: list[Any] = []
    errors: list[BaseException] = []

    def one(conn: Conn, i: int) -> None:
        try:
            barrier.wait()
            got.append(submit(conn, key, f"try {i}")["id"])
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=one, args=(c, i)) for i, c in enumerate(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for c in conns:
            c.close()
    assert not errors, errors[:3]
    assert len(got) == n and len(set(got)) == 1
    assert count(db, "SELECT count(*) FROM reactor.jobs") == 1
    assert count(db, "SELECT count(*) FROM job_events") == 1


def test_a_snapshot_that_cannot_see_the_live_job_is_refused_not_duplicated(dsn: str, db: Conn) -> None:
    with psycopg.connect(dsn) as rr:
        rr.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        rr.execute("SELECT 1")  # the snapshot is taken here, before the other job commits
        submit(db, "rr-key")
        with pytest.raises(psycopg.errors.UniqueViolation):
            submit(rr, "rr-key")
    assert count(db, "SELECT count(*) FROM reactor.jobs") == 1


def test_a_user_supplied_id_still_collides(db: Conn) -> None:
    job_id = submit(db, None)["id"]
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute("INSERT INTO jobs (id, job_type, payload) VALUES (%s, 'doubt', '{}')", (job_id,))


def test_the_insert_postgrest_makes_returns_the_existing_job(db: Conn) -> None:
    first = submit(db, "rest-1")
    # what POST /rest/v1/jobs with Prefer: return=representation sends
    statement: LiteralString = (
        'WITH pgrst_source AS (INSERT INTO "public"."jobs"("job_type", "payload", "idempotency_key") '
        "SELECT \"pgrst_body\".\"job_type\", \"pgrst_body\".\"payload\", \"pgrst_body\".\"idempotency_key\" "
        "FROM (SELECT %s::json AS json_data) pgrst_payload, "
        'LATERAL (SELECT "job_type", "payload", "idempotency_key" FROM json_to_recordset(pgrst_payload.json_data) '
        'AS _("job_type" text, "payload" jsonb, "idempotency_key" text)) pgrst_body RETURNING "public"."jobs".*) '
        "SELECT coalesce(json_agg(_postgrest_t), '[]') AS body FROM (SELECT * FROM pgrst_source) _postgrest_t")
    body = '[{"job_type": "topic_short", "payload": {"topic": "other"}, "idempotency_key": "rest-1"}]'
    row = db.execute(statement, (body,)).fetchone()
    assert row is not None
    [job] = row[0]
    assert (job["id"], job["status"], job["queue_position"]) == (str(first["id"]), "queued", 1)
    assert count(db, "SELECT count(*) FROM reactor.jobs") == 1
