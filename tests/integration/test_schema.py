from __future__ import annotations

import psycopg


def test_first_job_is_position_one(db: psycopg.Connection[object]) -> None:
    row = db.execute(
        "INSERT INTO jobs (job_type, payload) VALUES ('doubt', '{\"question\": \"why?\"}') "
        "RETURNING queue_position"
    ).fetchone()
    assert row == (1,)
