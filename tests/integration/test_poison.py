"""One bad row fails alone: poison payloads, refused outcomes, unreadable claims, hostile NOTIFYs.

Real PostgreSQL, real reactors (in this process), the orchestrator double over real HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from reactor.core.models import ClaimedJob, Outcome
from reactor.db.migrations import discover, migrate_down, migrate_up
from reactor.service import Service, ServiceSettings
from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.processes import until
from tests.support.reactors import FAST_DISPATCH, running_reactor, wait_for

pytestmark = pytest.mark.anyio

FINAL = ("completed", "failed", "cancelled")


def nested(depth: int) -> str:
    """A payload whose ``extra`` nests arrays ``depth`` deep (as JSON text: Python cannot build it)."""
    return '{"question": "why?", "extra": ' + "[" * depth + "]" * depth + "}"


#: payloads no renderer can use, as JSON text
POISON: dict[str, str] = {
    "nested 2,000": nested(2000),
    "nested 5,000": nested(5000),
    "nested 9,000": nested(9000),
    "nested 100 (decodes, past the limit)": nested(100),
    "100,000-element array": json.dumps({"question": "why?", "items": list(range(100_000))}),
    "multi-megabyte input": json.dumps({"question": "x" * 3_000_000}),
    "input an object": json.dumps({"question": {"nested": True}}),
    "style a number": json.dumps({"question": "why?", "style": 7}),
    "length an object": json.dumps({"question": "why?", "length": {"short": True}}),
    "voice a list": json.dumps({"question": "why?", "voice": ["asha"]}),
}


def insert_text(db: psycopg.Connection[Any], payload: str, job_type: str = "doubt") -> str:
    row = db.execute("INSERT INTO jobs (job_type, payload) VALUES (%s, %s::jsonb) RETURNING id",
                     (job_type, payload)).fetchone()
    assert row
    return str(row[0])


def good(db: psycopg.Connection[Any], n: int = 1) -> list[str]:
    # a topic of its own each: identical topic_short jobs would share one render (the cache)
    return [str(r[0]) for r in db.execute(
        "INSERT INTO jobs (job_type, payload) "
        "SELECT 'topic_short', jsonb_build_object('topic', 't' || gen_random_uuid()) "
        "FROM generate_series(1, %s) g RETURNING id", (n,))]


def rows(db: psycopg.Connection[Any], ids: list[str]) -> dict[str, dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT id::text, status, attempt, retry_count, error_category, error_message "
                    "FROM reactor.jobs WHERE id = ANY(%s::uuid[])", (ids,))
        return {r["id"]: r for r in cur.fetchall()}


@pytest.mark.parametrize("name", list(POISON))
def test_the_door_refuses_a_payload_no_renderer_could_use(db: psycopg.Connection[Any], name: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        insert_text(db, POISON[name])
    assert err.value.diag.column_name == "payload"
    assert str(err.value).startswith("jobs.payload")
    assert db.execute("SELECT count(*) FROM reactor.jobs").fetchone() == (0,)


def test_the_door_names_what_is_wrong(db: psycopg.Connection[Any]) -> None:
    cases = {
        nested(64): "jobs.payload is nested more than 64 levels deep",
        json.dumps({"question": "x" * 300_000}): "bytes as JSON text; at most 262144 (256 KiB)",
        json.dumps({"question": "x" * 4001}): "jobs.payload.question is 4001 characters; at most 4000",
        json.dumps({"question": True}): "jobs.payload.question must be text, got boolean",
        json.dumps({"question": "q", "voice": ""}): "jobs.payload.voice must be non-empty text",
        json.dumps({"question": "q", "style": "s" * 65}): "jobs.payload.style must be non-empty text of at most 64",
    }
    for payload, message in cases.items():
        with pytest.raises(psycopg.errors.CheckViolation, match=re.escape(message)):
            insert_text(db, payload)
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        db.execute("INSERT INTO jobs (job_type, payload, created_at) VALUES ('doubt', '{}', 'infinity')")
    assert err.value.diag.column_name == "created_at"
    # what the limits still let in: 63 more levels below the payload, text, numbers, a missing input
    # (that one fails when dispatched, INVALID_INPUT, as before)
    for ok in (nested(62), json.dumps({"date": 20261207}), json.dumps({"question": "q" * 4000}), "{}"):
        insert_text(db, ok, "daily_ca" if "date" in ok else "doubt")
    # an UPDATE that makes a payload unusable is refused the same way
    job = insert_text(db, json.dumps({"question": "fine"}))
    with pytest.raises(psycopg.errors.CheckViolation, match=re.escape("jobs.payload.question must be text")):
        db.execute("UPDATE jobs SET payload = '{\"question\": [1]}' WHERE id = %s", (job,))


@pytest.fixture
def legacy_db(dsn: str) -> Iterator[str]:
    """This test's database as it was before the payload guard (0006): rows inserted now are not
    checked at the door, like rows written before an upgrade."""
    migrate_down(dsn, to_version=5)
    try:
        yield dsn
    finally:
        migrate_up(dsn)


async def test_poison_rows_fail_alone_and_both_reactors_go_on(legacy_db: str, db: psycopg.Connection[Any]) -> None:
    dsn = legacy_db
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # paused: claims take mixed batches
    good_ids: list[str] = []
    poison_ids: dict[str, str] = {}
    for name, payload in POISON.items():
        good_ids += good(db, 2)
        poison_ids[insert_text(db, payload)] = name
    good_ids += good(db, 2)
    good_ids.append(insert_text(db, json.dumps({"question": "a good doubt"})))
    # a job type whose defaults are unusable fails its jobs alone too
    db.execute("INSERT INTO job_types (name, renderer, input_field, defaults) "
               "VALUES ('odd', 'revideo', 'topic', '{\"voice\": 42}')")
    poison_ids[insert_text(db, json.dumps({"topic": "t"}), "odd")] = "job type defaults unusable"
    migrate_up(dsn)  # the guard is on now; the rows above were never checked

    async with OrchestratorDouble() as orch, \
            running_reactor(dsn, orch.url, reactor_id="r1") as r1, \
            running_reactor(dsn, orch.url, reactor_id="r2") as r2:
        db.execute("UPDATE job_queue_config SET max_concurrent_renders = 6, max_manim_renders = 6")
        # and a steady stream of good jobs while the poison is dealt with; new poison is refused at
        # the door now, naming the field
        for i in range(20):
            good_ids += good(db, 2)
            with pytest.raises(psycopg.errors.CheckViolation) as refused:
                insert_text(db, list(POISON.values())[i % len(POISON)])
            assert refused.value.diag.column_name == "payload"
            await anyio.sleep(0.05)
        every = [*good_ids, *poison_ids]
        await wait_for(dsn, "SELECT count(*) FROM reactor.jobs WHERE status = ANY(%s) AND id = ANY(%s::uuid[])",
                       (list(FINAL), every), expect=lambda n: n == len(every), timeout=60)
        # both reactors are still running and still take work
        late = good(db, 6)
        await wait_for(dsn, "SELECT count(*) FROM reactor.jobs WHERE status = 'completed' AND id = ANY(%s::uuid[])",
                       (late,), expect=lambda n: n == len(late))
        assert not r1.stopping and not r2.stopping
        assert r1.dispatcher.stats.failed + r2.dispatcher.stats.failed == len(poison_ids)

    got = rows(db, every)
    for job_id, name in poison_ids.items():
        r = got[job_id]
        assert (r["status"], r["error_category"], r["retry_count"], r["attempt"]) == (
            "failed", "INVALID_INPUT", 0, 1), (name, r)
        assert "payload" in r["error_message"] or "defaults" in r["error_message"], (name, r["error_message"])
    for job_id in good_ids:
        r = got[job_id]
        # not delayed by a retry, not charged one, taken once
        assert (r["status"], r["retry_count"], r["attempt"]) == ("completed", 0, 1), r
    rendered = {r["job_id"] for r in orch.requests}
    assert rendered.isdisjoint(poison_ids)
    assert set(good_ids) <= rendered
    # the reasons say what was wrong
    reasons = {poison_ids[i]: got[i]["error_message"] for i in poison_ids}
    assert reasons["nested 9,000"] == "payload is nested too deep to decode"
    assert reasons["nested 100 (decodes, past the limit)"] == "payload is nested more than 64 levels deep"
    assert reasons["multi-megabyte input"].startswith("payload is 3000016 bytes as JSON text; at most 262144")
    assert reasons["style a number"] == "payload.style must be non-empty text"


async def test_an_outcome_the_database_refuses_fails_that_job_alone(dsn: str, db: psycopg.Connection[Any]) -> None:
    ids = good(db, 6)
    victim = ids[2]
    # an operator's constraint that this one completion breaks (any refusal that is not an outage)
    db.execute(sql.SQL("ALTER TABLE reactor.jobs ADD CONSTRAINT no_video_for_victim CHECK "
                       "(result IS NULL OR result->>'video_url' NOT LIKE {})").format(sql.Literal(f"%{victim}%")))
    async with OrchestratorDouble(latency_ms=50) as orch, running_reactor(dsn, orch.url) as service:
        await wait_for(dsn, "SELECT count(*) FROM reactor.jobs WHERE status = ANY(%s)", (list(FINAL),),
                       expect=lambda n: n == len(ids))
        later = good(db, 3)
        await wait_for(dsn, "SELECT count(*) FROM reactor.jobs WHERE status = 'completed' AND id = ANY(%s::uuid[])",
                       (later,), expect=lambda n: n == 3)
        assert not service.stopping
    got = rows(db, ids)
    v = got[victim]
    assert (v["status"], v["error_category"]) == ("failed", "UNKNOWN")
    assert "the outcome (completed) could not be recorded" in v["error_message"]
    assert "no_video_for_victim" in v["error_message"]
    assert all(got[i]["status"] == "completed" and got[i]["retry_count"] == 0 for i in ids if i != victim)


async def test_a_claim_whose_answer_cannot_be_read_puts_its_jobs_back(dsn: str, db: psycopg.Connection[Any]) -> None:
    ids = good(db, 3)
    async with OrchestratorDouble() as orch:
        settings = ServiceSettings(dsn=dsn, orchestrator_url=orch.url, dispatch=FAST_DISPATCH,
                                   handle_signals=False)
        service = Service(settings)
        real = service.db.finish_and_claim
        broken = 0

        async def finish_and_claim(outcomes: Sequence[Outcome], max_jobs: int, lease_s: float,
                                   clock: datetime) -> tuple[set[UUID], list[ClaimedJob]]:
            nonlocal broken
            written, jobs = await real(outcomes, max_jobs, lease_s, clock)
            if jobs and broken == 0:
                broken += 1
                raise RuntimeError("simulated: the rows could not be read")  # after the claim committed
            return written, jobs

        service.db.finish_and_claim = finish_and_claim  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            await wait_for(dsn, "SELECT count(*) FROM reactor.jobs WHERE status = 'completed'",
                           expect=lambda n: n == len(ids))
            service.request_stop()
    got = rows(db, ids)
    assert broken == 1
    # put back without spending a retry, then done; nothing waited for a lease to expire
    assert all(r["status"] == "completed" and r["retry_count"] == 0 for r in got.values()), got
    assert sorted(r["attempt"] for r in got.values())[-1] == 2
    assert len(orch.requests) == len(ids)


async def test_hostile_notifications_change_nothing(dsn: str, db: psycopg.Connection[Any]) -> None:
    hostile = [
        "[" * 3000 + "]" * 3000,
        '{"n": "1", "kind": 5, "id": [], "seq": "12", "q": {}, "f": -3, "c": 1e999}',
        '{"n": 1, "id": "not-a-uuid", "old_status": {"x": 1}, "status": ["queued"], "actor": null}',
        '{"truncated": "yes", "n": true}',
        "\x01not json at all",
        '{"a": ' * 100 + "1" + "}" * 100,
        "1e999999",
        '"a string"',
        "",
    ]
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url) as service:
        for channel in ("reactor_events", "reactor_config", "reactor_alerts", "reactor_fleet"):
            for text in hostile:
                db.execute("SELECT pg_notify(%s, %s)", (channel, text))
        ids = good(db, 3)
        await wait_for(dsn, "SELECT count(*) FROM reactor.jobs WHERE status = 'completed' AND id = ANY(%s::uuid[])",
                       (ids,), expect=lambda n: n == 3)
        await until(lambda: service.listener.connected, "the listener")
        assert service.listener.reconnects == 0  # it never fell over
        assert not service.stopping


def test_0006_rolls_back_to_0005(dsn: str, db: psycopg.Connection[Any]) -> None:
    assert [m.version for m in migrate_down(dsn, to_version=5)] == sorted(
        (m.version for m in discover() if m.version > 5), reverse=True)
    insert_text(db, nested(200))  # nothing checks it now
    assert db.execute("SELECT count(*) FROM pg_proc WHERE proname IN ('payload_problem', 'jobs_payload_guard')"
                      ).fetchone() == (0,)
    migrate_up(dsn)
    with pytest.raises(psycopg.errors.CheckViolation):
        insert_text(db, nested(200))
