"""Events, counters and NOTIFY: one small notification per committed transaction (the reactor's
finish_and_claim: one for its outcomes, one for its claims), gapless seq."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg.rows import dict_row

Conn = psycopg.Connection[object]

WAIT = 5.0  # seconds to wait for a notification that must come
QUIET = 0.2  # seconds of silence that show no (further) notification comes


def rows(conn: Conn, query: LiteralString, params: tuple[Any, ...] | None = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def one(conn: Conn, query: LiteralString, params: tuple[Any, ...] | None = None) -> dict[str, Any]:
    found = rows(conn, query, params)
    assert len(found) == 1, found
    return found[0]


def last_seq(conn: Conn) -> int:
    value: int = one(conn, "SELECT last_seq FROM reactor.counters")["last_seq"]
    return value


@pytest.fixture
def listener(dsn: str) -> Iterator[Conn]:
    """A second connection listening on reactor_events and reactor_config."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN reactor_events")
        conn.execute("LISTEN reactor_config")
        yield conn


def receive(conn: Conn, count: int, channel: str = "reactor_events") -> list[dict[str, Any]]:
    """Exactly ``count`` notifications on ``channel`` (and nothing else afterwards)."""
    got = [(n.channel, n.payload) for n in conn.notifies(timeout=WAIT, stop_after=count)]
    got += [(n.channel, n.payload) for n in conn.notifies(timeout=QUIET)]
    assert [c for c, _ in got] == [channel] * count, got
    decoded: list[dict[str, Any]] = [json.loads(p) for _, p in got]
    return decoded


def subset(msg: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    """The part of a payload named by ``keys`` (payloads may carry more keys than tested here)."""
    return {k: msg.get(k, "<missing>") for k in keys}


def assert_silent(conn: Conn) -> None:
    got = [(n.channel, n.payload) for n in conn.notifies(timeout=QUIET)]
    assert got == []


def test_every_insert_and_status_change_notifies_with_next_seq(db: Conn, listener: Conn) -> None:
    seq = last_seq(db)
    job = one(db, "INSERT INTO jobs (job_type, priority) VALUES ('doubt', 'high') RETURNING id, user_id")
    jid = str(job["id"])
    [msg] = receive(listener, 1)
    seq += 1
    expected = {
        "seq": seq, "n": 1, "kind": "inserted", "id": jid, "status": "queued", "priority": "high",
        "job_type": "doubt", "renderer": "manim", "user_id": None,
    }
    assert subset(msg, expected) == expected

    for status, kind in [
        ("processing", "started"),
        ("queued", "retrying"),
        ("processing", "started"),
        ("completed", "completed"),
    ]:
        db.execute("UPDATE jobs SET status = %s WHERE id = %s", (status, jid))
        [msg] = receive(listener, 1)
        seq += 1
        assert (msg["seq"], msg["n"], msg["kind"], msg["id"], msg["status"]) == (seq, 1, kind, jid, status)

    # an update that changes neither status nor priority is no event
    db.execute("UPDATE jobs SET result = '{\"url\": \"u\"}' WHERE id = %s", (jid,))
    assert_silent(listener)
    assert last_seq(db) == seq


def test_one_transaction_one_notification(db: Conn, listener: Conn) -> None:
    seq = last_seq(db)
    with db.transaction():
        jid = one(db, "INSERT INTO jobs (job_type) VALUES ('topic_short') RETURNING id")["id"]
        db.execute("UPDATE jobs SET status = 'processing' WHERE id = %s", (jid,))
        db.execute("INSERT INTO jobs (job_type) VALUES ('doubt'), ('daily_ca')")
        assert_silent(listener)  # nothing before commit
    [msg] = receive(listener, 1)
    assert subset(msg, {"seq": 0, "n": 0}) == {"seq": seq + 4, "n": 4}
    kinds = [r["kind"] for r in rows(db, "SELECT kind FROM job_events WHERE seq > %s ORDER BY seq", (seq,))]
    assert kinds == ["inserted", "started", "inserted", "inserted"]


def test_bulk_insert_sends_one_notification(db: Conn, listener: Conn) -> None:
    seq = last_seq(db)
    db.execute(
        "INSERT INTO jobs (job_type, payload) "
        "SELECT 'doubt', jsonb_build_object('question', g::text) FROM generate_series(1, 10000) g"
    )
    [msg] = receive(listener, 1)
    assert subset(msg, {"seq": 0, "n": 0}) == {"seq": seq + 10000, "n": 10000}
    ev = one(
        db,
        "SELECT count(*) AS n, count(DISTINCT seq) AS distinct_seq, min(seq) AS lo, max(seq) AS hi, "
        "count(DISTINCT job_id) AS jobs, bool_and(kind = 'inserted') AS all_inserted "
        "FROM job_events WHERE seq > %s",
        (seq,),
    )
    assert ev == {
        "n": 10000, "distinct_seq": 10000, "lo": seq + 1, "hi": seq + 10000, "jobs": 10000,
        "all_inserted": True,
    }
    assert last_seq(db) == seq + 10000
    assert one(db, "SELECT queued FROM reactor.counters")["queued"] == 10000


def test_notification_stays_small_for_a_huge_payload(db: Conn, listener: Conn) -> None:
    jid = one(
        db,
        "INSERT INTO jobs (job_type, payload) "
        # as large as the payload guard lets in (256 KiB), 30 times NOTIFY's limit
        "VALUES ('doubt', jsonb_build_object('question', 'q', 'notes', repeat('x', 250000))) RETURNING id",
    )["id"]
    raw = [n.payload for n in listener.notifies(timeout=WAIT, stop_after=1)]
    assert len(raw) == 1
    assert len(raw[0].encode()) < 8000
    msg = json.loads(raw[0])
    assert (msg["id"], msg["kind"], msg["n"]) == (str(jid), "inserted", 1)
    db.execute("UPDATE jobs SET status = 'processing' WHERE id = %s", (jid,))
    [msg] = receive(listener, 1)
    assert msg["kind"] == "started"


def test_rollback_sends_nothing_and_leaves_no_gap(db: Conn, listener: Conn) -> None:
    seq = last_seq(db)
    counters = one(db, "SELECT * FROM reactor.counters")
    kept = one(db, "INSERT INTO jobs (job_type) VALUES ('doubt') RETURNING id")["id"]
    receive(listener, 1)
    seq += 1

    with db.transaction(force_rollback=True):
        db.execute("INSERT INTO jobs (job_type) SELECT 'doubt' FROM generate_series(1, 50)")
        db.execute("UPDATE jobs SET status = 'processing' WHERE id = %s", (kept,))
    # a failed statement rolls back too
    with pytest.raises(psycopg.Error), db.transaction():
        db.execute("INSERT INTO jobs (job_type) VALUES ('topic_short')")
        db.execute("INSERT INTO jobs (job_type) VALUES ('nope')")
    assert_silent(listener)
    assert last_seq(db) == seq
    assert one(db, "SELECT count(*) AS n FROM reactor.event_stage")["n"] == 0
    assert one(db, "SELECT count(*) AS n FROM reactor.pending_commits")["n"] == 0

    db.execute("INSERT INTO jobs (job_type) VALUES ('topic_short')")
    [msg] = receive(listener, 1)
    assert msg["seq"] == seq + 1
    seqs = [r["seq"] for r in rows(db, "SELECT seq FROM job_events ORDER BY seq")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert one(db, "SELECT queued FROM reactor.counters")["queued"] == counters["queued"] + 2


def test_job_life_in_job_events(db: Conn, listener: Conn) -> None:
    jid: uuid.UUID = one(db, "INSERT INTO jobs (job_type) VALUES ('doubt') RETURNING id")["id"]
    other = one(db, "INSERT INTO jobs (job_type) VALUES ('topic_short') RETURNING id")["id"]
    path = ["processing", "queued", "processing", "failed", "queued", "cancelled", "queued",
            "processing", "completed"]
    for status in path:
        db.execute("UPDATE jobs SET status = %s WHERE id = %s", (status, jid))
    db.execute("UPDATE jobs SET status = 'processing' WHERE id = %s", (other,))
    db.execute("UPDATE jobs SET priority = 'high' WHERE id = %s", (jid,))
    db.execute("DELETE FROM jobs WHERE id = %s", (jid,))
    receive(listener, 2 + len(path) + 3)

    events = rows(
        db, "SELECT seq, kind, status, old_status, priority FROM job_events WHERE job_id = %s ORDER BY seq",
        (jid,),
    )
    assert [(e["kind"], e["old_status"], e["status"]) for e in events] == [
        ("inserted", None, "queued"),
        ("started", "queued", "processing"),
        ("retrying", "processing", "queued"),
        ("started", "queued", "processing"),
        ("failed", "processing", "failed"),
        ("requeued", "failed", "queued"),
        ("cancelled", "queued", "cancelled"),
        ("requeued", "cancelled", "queued"),
        ("started", "queued", "processing"),
        ("completed", "processing", "completed"),
        ("reprioritized", "completed", "completed"),
        ("deleted", "completed", None),
    ]
    assert events[-2]["priority"] == "high"
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    # the other job's start sits between: seq is global and gapless
    assert seqs[-2] - seqs[-3] == 2


def test_config_update_notifies_reactor_config(db: Conn, listener: Conn) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 5")
    got = [n.channel for n in listener.notifies(timeout=WAIT, stop_after=1)]
    got += [n.channel for n in listener.notifies(timeout=QUIET)]
    assert got == ["reactor_config"]
    with pytest.raises(psycopg.Error):
        db.execute("UPDATE job_queue_config SET max_concurrent_renders = -5")
    assert_silent(listener)


COUNTS: LiteralString = """
SELECT count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'processing') AS processing,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE status = 'queued' AND priority = 'high') AS queued_high,
       count(*) FILTER (WHERE status = 'queued' AND priority = 'medium') AS queued_medium,
       count(*) FILTER (WHERE status = 'queued' AND priority = 'low') AS queued_low
FROM jobs
"""


def counters(conn: Conn) -> dict[str, Any]:
    row = one(conn, "SELECT * FROM reactor.counters")
    return {k: row[k] for k in one(conn, COUNTS)}


def test_counters_match_a_recount_after_mixed_workload(db: Conn) -> None:
    db.execute(
        "INSERT INTO jobs (job_type, priority) "
        "SELECT (ARRAY['doubt', 'topic_short', 'daily_ca'])[1 + g % 3], "
        "       (ARRAY['high', 'medium', 'low'])[1 + g % 3 + (g / 7) % 2 * 0] "
        "FROM generate_series(1, 60) g"
    )
    db.execute("INSERT INTO jobs (job_type, priority, status) VALUES ('doubt', 'low', 'processing')")
    statements: list[LiteralString] = [
        # dequeue, finish, fail, cancel
        "UPDATE jobs SET status = 'processing' WHERE id IN "
        "(SELECT id FROM jobs WHERE status = 'queued' ORDER BY queue_position LIMIT 12)",
        "UPDATE jobs SET status = 'completed' WHERE id IN "
        "(SELECT id FROM jobs WHERE status = 'processing' ORDER BY created_at LIMIT 5)",
        "UPDATE jobs SET status = 'failed' WHERE id IN "
        "(SELECT id FROM jobs WHERE status = 'processing' ORDER BY created_at LIMIT 3)",
        "UPDATE jobs SET status = 'cancelled' WHERE id IN "
        "(SELECT id FROM jobs WHERE status = 'queued' AND priority = 'low' LIMIT 4)",
        # priority changes of queued jobs, alone and together with a status change
        "UPDATE jobs SET priority = 'high' WHERE id IN "
        "(SELECT id FROM jobs WHERE status = 'queued' AND priority = 'low' LIMIT 3)",
        "UPDATE jobs SET priority = 'low' WHERE id IN "
        "(SELECT id FROM jobs WHERE status = 'queued' AND priority = 'medium' LIMIT 2)",
        "UPDATE jobs SET priority = 'medium', status = 'processing' WHERE id IN "
        "(SELECT id FROM jobs WHERE status = 'queued' AND priority = 'high' LIMIT 2)",
        "UPDATE jobs SET priority = 'low', status = 'queued' WHERE id IN "
        "(SELECT id FROM jobs WHERE status = 'failed' LIMIT 2)",
        # deletes of queued and finished jobs
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status = 'queued' LIMIT 4)",
        "DELETE FROM jobs WHERE status = 'completed'",
    ]
    for statement in statements:
        db.execute(statement)
        assert counters(db) == one(db, COUNTS), statement

    # the same inside one transaction, with the same row changed several times
    with db.transaction():
        jid = one(db, "INSERT INTO jobs (job_type, priority) VALUES ('doubt', 'low') RETURNING id")["id"]
        db.execute("UPDATE jobs SET priority = 'high' WHERE id = %s", (jid,))
        db.execute("UPDATE jobs SET status = 'processing' WHERE id = %s", (jid,))
        db.execute("UPDATE jobs SET status = 'queued', priority = 'medium' WHERE id = %s", (jid,))
        db.execute("UPDATE jobs SET priority = 'low' WHERE status = 'queued' AND priority = 'high'")
        db.execute("DELETE FROM jobs WHERE status = 'cancelled'")
    truth = one(db, COUNTS)
    assert counters(db) == truth
    assert all(truth[k] > 0 for k in ("queued", "processing", "failed", "queued_medium", "queued_low"))


def _finish_and_claim(conn: Conn, batch: list[dict[str, Any]], max_jobs: int) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM reactor.finish_and_claim(%s::jsonb, 'r-direct', %s, interval '30 seconds')",
                (json.dumps(batch), max_jobs))


def test_the_reactors_own_writes_journal_as_they_go(db: Conn, listener: Conn) -> None:
    """finish_and_claim numbers its events in the statement (0004): the same events, payloads and
    counters as the staged path, its outcomes before its claims, one notification for each."""
    db.execute("SELECT set_config('reactor.actor', 'reactor:r-direct', false)")
    seq = last_seq(db)
    first = one(db, "INSERT INTO jobs (job_type, priority) VALUES ('doubt', 'high') RETURNING id")["id"]
    second = one(db, "INSERT INTO jobs (job_type, priority) VALUES ('topic_short', 'low') RETURNING id")["id"]
    receive(listener, 2)

    [a, b] = _finish_and_claim(db, [], 2)
    assert [(r["written"], r["id"], r["attempt"]) for r in (a, b)] == [(False, first, 1), (False, second, 1)]
    [msg] = receive(listener, 1)
    # it took both it asked for, and the limit (10) leaves room for another claim ("more", 0014)
    assert msg == {"seq": seq + 4, "n": 2, "q": 0, "f": 0, "c": 0, "actor": "reactor:r-direct", "more": True}
    assert counters(db) == one(db, COUNTS)

    # one call: the first job fails and goes back (a retry due now), the second completes; the
    # claim then takes the first job again. Outcomes come first in seq, then the claim.
    outcomes = [
        {"id": str(first), "attempt": 1, "status": "queued", "retry_count": 1, "delay_s": 0,
         "error_category": "API_ERROR", "error_message": "503", "error_details": {}, "result": None},
        {"id": str(second), "attempt": 1, "status": "completed", "retry_count": 0, "delay_s": 0,
         "error_category": None, "error_message": None, "error_details": None, "result": {"video_url": "u"}},
    ]
    got = _finish_and_claim(db, outcomes, 1)
    assert sorted((r["written"], str(r["id"])) for r in got) == sorted(
        [(True, str(first)), (True, str(second)), (False, str(first))])
    finished, claimed = receive(listener, 2)
    # the outcomes say the same transaction claims after them ("claiming", 0014)
    assert finished == {"seq": seq + 6, "n": 2, "q": 1, "f": 2, "c": 0, "actor": "reactor:r-direct",
                        "claiming": True}
    expected = {"seq": seq + 7, "n": 1, "kind": "started", "id": str(first), "status": "processing",
                "old_status": "queued", "priority": "high", "job_type": "doubt", "actor": "reactor:r-direct"}
    assert subset(claimed, expected) == expected
    log = rows(db, "SELECT seq, job_id, kind, old_status, retry_count, error_category, actor "
                   "FROM job_events WHERE seq > %s ORDER BY seq", (seq,))
    assert [(r["seq"], r["job_id"], r["kind"]) for r in log] == [
        (seq + 1, first, "inserted"), (seq + 2, second, "inserted"),
        (seq + 3, first, "started"), (seq + 4, second, "started"),
        (seq + 5, first, "retrying"), (seq + 6, second, "completed"),
        (seq + 7, first, "started"),
    ]
    assert (log[4]["retry_count"], log[4]["error_category"], log[4]["old_status"]) == (1, "API_ERROR", "processing")
    assert {r["actor"] for r in log[2:]} == {"reactor:r-direct"}
    assert counters(db) == one(db, COUNTS)

    # an outcome for an attempt that is not ours any more writes nothing and numbers nothing
    assert _finish_and_claim(db, [dict(outcomes[1], id=str(first))], 0) == []
    assert_silent(listener)
    assert last_seq(db) == seq + 7


def test_the_reactors_call_says_claiming_when_it_claims_after_its_outcomes(db: Conn, listener: Conn) -> None:
    """The reactor calls finish_settle_and_claim (0013: the render cache settles between outcomes and
    claim), which writes the outcomes through finish_and_claim with p_max 0: their NOTIFY still says
    "claiming" when the call claims after them (0014), and does not when it does not claim."""
    jid = one(db, "INSERT INTO jobs (job_type, priority) VALUES ('doubt', 'high') RETURNING id")["id"]
    receive(listener, 1)
    call = ("SELECT * FROM reactor.finish_settle_and_claim(%s::jsonb, 'r-direct', %s, interval '30 seconds')")
    [claimed] = rows(db, call, (json.dumps([]), 1))
    assert claimed["id"] == jid
    receive(listener, 1)

    def outcome(job: Any) -> list[dict[str, Any]]:
        return [{"id": str(job), "attempt": 1, "status": "completed", "retry_count": 0, "delay_s": 0,
                 "error_category": None, "error_message": None, "error_details": None,
                 "result": {"video_url": "u"}}]

    rows(db, call, (json.dumps(outcome(jid)), 1))
    [finished] = receive(listener, 1)
    assert finished["kind"] == "completed" and finished["claiming"] is True

    other = one(db, "INSERT INTO jobs (job_type, priority) VALUES ('doubt', 'high') RETURNING id")["id"]
    receive(listener, 1)
    rows(db, call, (json.dumps([]), 1))
    receive(listener, 1)
    rows(db, call, (json.dumps(outcome(other)), 0))
    [finished] = receive(listener, 1)
    assert finished["kind"] == "completed" and "claiming" not in finished


def test_a_session_cannot_switch_the_journal_off_for_its_own_updates(db: Conn, listener: Conn) -> None:
    """The direct path's mark is the writing transaction's own id, set inside the reactor's
    functions: a value a session sets for itself does not match, and its updates are journalled."""
    seq = last_seq(db)
    jid = one(db, "INSERT INTO jobs (job_type) VALUES ('doubt') RETURNING id")["id"]
    receive(listener, 1)
    db.execute("SET reactor.journal = 'direct'")
    db.execute("UPDATE jobs SET priority = 'high' WHERE id = %s", (jid,))
    with db.transaction():
        db.execute("SELECT set_config('reactor.journal', (pg_current_xact_id()::text::bigint + 1)::text, true)")
        db.execute("UPDATE jobs SET status = 'cancelled' WHERE id = %s", (jid,))
    assert [m["kind"] for m in receive(listener, 2)] == ["reprioritized", "cancelled"]
    assert last_seq(db) == seq + 3
    assert counters(db) == one(db, COUNTS)


def test_a_claim_says_more_only_when_it_filled_its_max_with_room_left(db: Conn, listener: Conn) -> None:
    """0014: several reactors wake each other only when there is work for them. A claim that took
    p_max while the limits leave room says "more"; one stopped by the limits or the queue's end does
    not; outcomes followed by a claim in the same transaction say "claiming"."""
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 3")
    receive(listener, 1, channel="reactor_config")
    db.execute("INSERT INTO jobs (job_type, payload) SELECT 'topic_short', '{\"topic\": \"t\"}' "
               "FROM generate_series(1, 5)")
    receive(listener, 1)

    def claim(reactor: str, batch: list[dict[str, Any]], max_jobs: int) -> list[dict[str, Any]]:
        return rows(db, "SELECT * FROM reactor.finish_and_claim(%s::jsonb, %s, %s, interval '30 seconds')",
                    (json.dumps(batch), reactor, max_jobs))

    taken = claim("r-x", [], 2)  # 2 of the 3 the limit allows: another reactor may take the third
    assert len(taken) == 2
    [msg] = receive(listener, 1)
    assert msg.get("more") is True and "claiming" not in msg
    assert len(claim("r-y", [], 5)) == 1  # stopped by the limit: nobody else can take more
    [msg] = receive(listener, 1)
    assert "more" not in msg
    done = {"id": str(taken[0]["id"]), "attempt": 1, "status": "completed", "retry_count": 0, "delay_s": 0,
            "error_category": None, "error_message": None, "error_details": None, "result": {"video_url": "u"}}
    got = claim("r-x", [done], 1)  # the room it frees, it takes itself
    assert sorted(r["written"] for r in got) == [False, True]
    finished, started = receive(listener, 2)
    assert finished.get("claiming") is True and finished["status"] == "completed"
    assert started["kind"] == "started" and "more" not in started  # the fleet is full again
    # outcomes written without a claim (a draining reactor): the others must take the room
    done = {**done, "id": str(got[[r["written"] for r in got].index(False)]["id"])}
    assert [r["written"] for r in claim("r-x", [done], 0)] == [True]
    [finished] = receive(listener, 1)
    assert "claiming" not in finished
    assert counters(db) == one(db, COUNTS)
