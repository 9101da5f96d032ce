"""get_queue_stats() against a hand count, and update_queue_positions()."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from statistics import mean
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


COUNT_KEYS = (
    "total", "queued", "processing", "completed", "failed", "cancelled",
    "queued_high", "queued_medium", "queued_low", "completed_last_hour", "failed_last_hour",
)
STATS_KEYS = {
    *COUNT_KEYS, "avg_wait_seconds", "avg_processing_seconds", "oldest_queued_at",
    "oldest_queued_age_seconds", "max_renders", "max_manim_renders", "peak", "paused",
    "last_seq", "as_of", "renders_saved",
}


@dataclass(frozen=True)
class Job:
    """A job of the known data set; times are minutes before the reference time."""

    job_type: str
    priority: str
    status: str
    created: float
    started: float | None = None
    completed: float | None = None


HOUR = 60.0
DATA = [
    # completed in the last hour (wait 600 s / run 600 s; wait 60 s / run 540 s)
    Job("doubt", "medium", "completed", 50, 40, 30),
    Job("topic_short", "high", "completed", 20, 19, 10),
    # completed in the last hour, started before it: its run counts, its wait does not
    Job("daily_ca", "low", "completed", 90, 70, 15),
    # completed two hours ago: counts in nothing of the last hour
    Job("doubt", "medium", "completed", 180, 150, 120),
    # failed in the last hour (one after running, one before it started), and one long ago
    Job("doubt", "high", "failed", 45, 44, 5),
    Job("topic_short", "medium", "failed", 12, None, 10),
    Job("daily_ca", "low", "failed", 200, 190, 180),
    Job("topic_short", "low", "cancelled", 30, None, 25),
    # running: one started 3 minutes ago (wait counts), one 70 minutes ago (does not)
    Job("doubt", "medium", "processing", 8, 3),
    Job("topic_short", "high", "processing", 120, 70),
    # waiting, of each priority and both renderers; the oldest is a low revideo job
    Job("doubt", "high", "queued", 5),
    Job("topic_short", "high", "queued", 2),
    Job("doubt", "medium", "queued", 15),
    Job("daily_ca", "medium", "queued", 7),
    Job("topic_short", "medium", "queued", 1),
    Job("topic_short", "low", "queued", 25),
    Job("doubt", "low", "queued", 4),
]


def load(db: Conn) -> datetime:
    ref: datetime = one(db, "SELECT now() AS t")["t"]

    def at(minutes: float | None) -> datetime | None:
        return None if minutes is None else ref - timedelta(minutes=minutes)

    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO jobs (job_type, priority, status, created_at, started_at, completed_at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            [(j.job_type, j.priority, j.status, at(j.created), at(j.started), at(j.completed))
             for j in DATA],
        )
    # the inserts kept the times given (the data set means what it says)
    stored = rows(db, "SELECT created_at, started_at, completed_at FROM jobs ORDER BY created_at")
    assert sorted((at(j.created), at(j.started), at(j.completed)) for j in DATA) == [
        (r["created_at"], r["started_at"], r["completed_at"]) for r in stored
    ]
    return ref


def hand_count(ref: datetime) -> dict[str, Any]:
    def count(**where: str) -> int:
        return sum(all(getattr(j, k) == v for k, v in where.items()) for j in DATA)

    waits = [
        (j.created - j.started) * 60 for j in DATA if j.started is not None and j.started < HOUR
    ]
    runs = [
        (j.started - j.completed) * 60
        for j in DATA
        if j.status == "completed" and j.completed is not None and j.completed < HOUR
        and j.started is not None
    ]
    oldest = max(j.created for j in DATA if j.status == "queued")
    return {
        "total": len(DATA),
        "queued": count(status="queued"),
        "processing": count(status="processing"),
        "completed": count(status="completed"),
        "failed": count(status="failed"),
        "cancelled": count(status="cancelled"),
        "queued_high": count(status="queued", priority="high"),
        "queued_medium": count(status="queued", priority="medium"),
        "queued_low": count(status="queued", priority="low"),
        "completed_last_hour": sum(
            j.status == "completed" and j.completed is not None and j.completed < HOUR for j in DATA
        ),
        "failed_last_hour": sum(
            j.status == "failed" and j.completed is not None and j.completed < HOUR for j in DATA
        ),
        "avg_wait_seconds": mean(waits),
        "avg_processing_seconds": mean(runs),
        "oldest_queued_at": ref - timedelta(minutes=oldest),
        "oldest_queued_age_seconds": oldest * 60,
    }


def test_stats_match_a_hand_count(db: Conn) -> None:
    ref = load(db)
    expected = hand_count(ref)
    # sanity of the data set itself: every figure is exercised with a non-trivial value
    assert expected["avg_wait_seconds"] == pytest.approx((600 + 60 + 60 + 300) / 4)
    assert expected["avg_processing_seconds"] == pytest.approx((600 + 540 + 3300) / 3)
    assert (expected["completed_last_hour"], expected["failed_last_hour"]) == (3, 2)

    stats = one(db, "SELECT * FROM get_queue_stats()")
    assert set(stats) == STATS_KEYS
    assert {k: stats[k] for k in COUNT_KEYS} == {k: expected[k] for k in COUNT_KEYS}
    assert stats["avg_wait_seconds"] == pytest.approx(expected["avg_wait_seconds"], abs=1.0)
    assert stats["avg_processing_seconds"] == pytest.approx(expected["avg_processing_seconds"], abs=1.0)
    assert stats["oldest_queued_at"] == expected["oldest_queued_at"]
    age = (stats["as_of"] - ref).total_seconds() + expected["oldest_queued_age_seconds"]
    assert stats["oldest_queued_age_seconds"] == pytest.approx(age, abs=1.0)
    assert stats["oldest_queued_age_seconds"] == pytest.approx(25 * 60, abs=1.0)
    assert (stats["max_renders"], stats["max_manim_renders"], stats["peak"], stats["paused"]) == (
        10, 4, False, False,
    )
    assert stats["last_seq"] == len(DATA)

    # the figures follow the queue: start the oldest queued job
    db.execute(
        "UPDATE jobs SET status = 'processing' WHERE id = "
        "(SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at LIMIT 1)"
    )
    after = one(db, "SELECT * FROM get_queue_stats()")
    assert (after["queued"], after["queued_low"], after["processing"]) == (
        expected["queued"] - 1, expected["queued_low"] - 1, expected["processing"] + 1,
    )
    assert after["oldest_queued_at"] == ref - timedelta(minutes=15)
    # its 25-minute wait now counts (it started within the last hour)
    waits = [600.0, 60.0, 60.0, 300.0, 25 * 60 + (after["as_of"] - ref).total_seconds()]
    assert after["avg_wait_seconds"] == pytest.approx(mean(waits), abs=1.0)


def test_stats_on_an_empty_database(db: Conn) -> None:
    found = rows(db, "SELECT * FROM get_queue_stats()")
    assert len(found) == 1
    stats = found[0]
    assert set(stats) == STATS_KEYS
    assert {k: stats[k] for k in COUNT_KEYS} == dict.fromkeys(COUNT_KEYS, 0)
    for key in ("avg_wait_seconds", "avg_processing_seconds", "oldest_queued_at",
                "oldest_queued_age_seconds"):
        assert stats[key] is None, key
    assert stats["last_seq"] == 0
    assert stats["as_of"] is not None
    assert (stats["max_renders"], stats["max_manim_renders"], stats["paused"]) == (10, 4, False)

    whole = rows(db, "SELECT get_queue_stats() AS s")
    assert len(whole) == 1
    assert whole[0]["s"] is not None


def test_stats_call_styles(db: Conn) -> None:
    load(db)
    columns = one(db, "SELECT * FROM get_queue_stats()")

    # SELECT get_queue_stats(): one composite value holding the same fields
    composite = one(db, "SELECT get_queue_stats() AS s")["s"]
    assert isinstance(composite, tuple)
    assert len(composite) == len(columns)
    expanded = one(db, "SELECT (get_queue_stats()).*")
    assert {k: expanded[k] for k in COUNT_KEYS} == {k: columns[k] for k in COUNT_KEYS}

    # what PostgREST returns for POST /rpc/get_queue_stats: a JSON object with every key
    obj = one(db, "SELECT to_jsonb(s) AS j FROM get_queue_stats() s")["j"]
    assert isinstance(obj, dict)
    assert set(obj) == STATS_KEYS
    assert {k: obj[k] for k in COUNT_KEYS} == {k: columns[k] for k in COUNT_KEYS}
    assert obj["avg_wait_seconds"] == pytest.approx(columns["avg_wait_seconds"])


def test_update_queue_positions_returns_the_queued_count(db: Conn) -> None:
    assert one(db, "SELECT update_queue_positions() AS n")["n"] == 0
    load(db)
    queued = sum(j.status == "queued" for j in DATA)
    assert one(db, "SELECT update_queue_positions() AS n")["n"] == queued
    positions = rows(db, "SELECT queue_position FROM jobs WHERE queue_position IS NOT NULL")
    assert len(positions) == queued

    db.execute(
        "UPDATE jobs SET status = 'processing' WHERE id = "
        "(SELECT id FROM jobs WHERE queue_position = 1)"
    )
    assert one(db, "SELECT update_queue_positions() AS n")["n"] == queued - 1
    # it changes nothing
    xmins = rows(db, "SELECT id, xmin::text AS x FROM reactor.jobs ORDER BY id")
    db.execute("SELECT update_queue_positions()")
    assert rows(db, "SELECT id, xmin::text AS x FROM reactor.jobs ORDER BY id") == xmins
