"""The runbook commands (reactor status, jobs, show, retry, cancel, requeue-stuck, pause, resume,
config, submit, schedules, check) against a real database, through ``reactor.cli.main`` and as a process."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from reactor.cli.main import main
from reactor.db.migrations import discover, migrate_down
from reactor.ops.checks import transaction_pooler_reason

Conn = psycopg.Connection[Any]


@pytest.fixture(autouse=True)
def _no_env_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REACTOR_ORCHESTRATOR_URL", raising=False)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() points the root logger at this test's captured stderr: undo that afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["--log-level", "WARNING", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def insert(db: Conn, job_type: str = "doubt", **cols: Any) -> uuid.UUID:
    cols.setdefault("payload", json.dumps({"question": "q", "topic": "t", "date": "2026-01-01"}))
    names = ["job_type", *cols]
    row = db.execute(
        f"INSERT INTO reactor.jobs ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))}) RETURNING id",
        [job_type, *cols.values()],
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def job(db: Conn, job_id: uuid.UUID) -> dict[str, Any]:
    with db.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM reactor.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return row


def claim(db: Conn, reactor_id: str = "r-test") -> list[uuid.UUID]:
    rows = db.execute("SELECT id FROM reactor.claim_jobs(%s, 10, interval '15 seconds')", (reactor_id,)).fetchall()
    return [r[0] for r in rows]


# -- submit, show, jobs ------------------------------------------------------------------------


def test_submit_then_show_with_payload_and_events(
    dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run_json(capsys, "submit", "--dsn", dsn, "--type", "doubt", "--input", "Why is the sky blue?")
    assert first["queue_position"] == 1
    assert first["payload"] == {"question": "Why is the sky blue?"}  # the job type's input field
    assert first["priority"] == "medium" and first["renderer"] == "manim"

    rc, out, err = run(capsys, "submit", "--dsn", dsn, "--type", "topic_short", "--priority", "high",
                       "--payload", '{"topic": "Photosynthesis", "voice": "asha"}')
    assert rc == 0, err
    second_id, _, rest = out.strip().partition(" ")
    assert rest.startswith("queue_position 1 ")  # high goes first

    shown = run_json(capsys, "show", "--dsn", dsn, first["id"])
    assert shown["job"]["payload"] == {"question": "Why is the sky blue?"}
    assert shown["job"]["queue_position"] == 2
    assert [e["kind"] for e in shown["events"]] == ["inserted"]
    assert shown["events"][0]["actor"].startswith("cli:")

    db.execute("SELECT * FROM reactor.claim_jobs('r-test', 1, interval '15 seconds')")  # takes the high one
    db.execute("UPDATE reactor.jobs SET status = 'failed', error_category = 'NOT_FOUND', "
               "error_message = 'no such topic', error_details = '{\"status_code\": 404}' WHERE id = %s",
               (second_id,))
    rc, out, err = run(capsys, "show", "--dsn", dsn, second_id)
    assert rc == 0, err
    assert "Photosynthesis" in out and "NOT_FOUND" in out and "status_code" in out
    events = run_json(capsys, "show", "--dsn", dsn, second_id)["events"]
    assert [e["kind"] for e in events] == ["inserted", "started", "failed"]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)


def test_show_unknown_id_exits_1_and_a_malformed_id_exits_2(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    unknown = str(uuid.uuid4())
    rc, out, err = run(capsys, "show", "--dsn", dsn, unknown)
    assert (rc, out) == (1, "")
    assert err.strip() == f"reactor: no job {unknown}"

    rc, _, err = run(capsys, "show", "--dsn", dsn, "not-a-uuid")
    assert rc == 2
    assert err.startswith("reactor: a job id is a UUID")


def test_submit_refusals_exit_2_and_insert_nothing(dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "submit", "--dsn", dsn, "--type", "video", "--input", "x")
    assert rc == 2
    assert "jobs.job_type 'video' is not a known job type" in err
    rc, _, err = run(capsys, "submit", "--dsn", dsn, "--type", "doubt", "--payload", "{not json")
    assert rc == 2 and "--payload is not JSON" in err
    rc, _, err = run(capsys, "submit", "--dsn", dsn, "--type", "doubt", "--payload", "[1]")
    assert rc == 2 and "must be a JSON object" in err
    rc, _, err = run(capsys, "submit", "--dsn", dsn, "--type", "doubt", "--input", "x", "--user", "bob")
    assert rc == 2 and "--user is a UUID" in err
    count = db.execute("SELECT count(*) FROM reactor.jobs").fetchone()
    assert count == (0,)


def test_jobs_lists_newest_first_with_filters(dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    a1 = insert(db, "doubt", user_id=alice)
    b1 = insert(db, "topic_short", user_id=bob)
    a2 = insert(db, "daily_ca", user_id=alice, status="failed", error_category="INVALID_INPUT",
                error_message="payload.date is required for job type daily_ca")
    a3 = insert(db, "doubt", user_id=alice, priority="low")

    listed = run_json(capsys, "jobs", "--dsn", dsn)
    assert [j["id"] for j in listed] == [str(a3), str(a2), str(b1), str(a1)]
    assert [j["queue_position"] for j in listed] == [3, None, 2, 1]

    assert [j["id"] for j in run_json(capsys, "jobs", "--dsn", dsn, "--user", str(alice))] == [
        str(a3), str(a2), str(a1)]
    assert [j["id"] for j in run_json(capsys, "jobs", "--dsn", dsn, "--type", "doubt")] == [str(a3), str(a1)]
    assert [j["id"] for j in run_json(capsys, "jobs", "--dsn", dsn, "--status", "failed")] == [str(a2)]
    assert [j["id"] for j in run_json(capsys, "jobs", "--dsn", dsn, "--limit", "2")] == [str(a3), str(a2)]
    assert run_json(capsys, "jobs", "--dsn", dsn, "--status", "cancelled") == []

    rc, out, _ = run(capsys, "jobs", "--dsn", dsn, "--user", str(alice))
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "PRIORITY", "STATUS", "POS", "RETRIES", "CREATED", "ERROR"]
    assert str(a2) in lines[2] and "INVALID_INPUT: payload.date is required" in lines[2]
    assert len(lines) == 4

    with pytest.raises(SystemExit) as exc:  # argparse: exit 2
        main(["jobs", "--dsn", dsn, "--status", "stuck"])
    assert exc.value.code == 2


# -- status ------------------------------------------------------------------------------------


def test_status_shows_stats_limits_reactors_and_oldest(
    dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]
) -> None:
    db.execute("INSERT INTO reactor.reactors (id, hostname, pid, version) VALUES ('r-alive', 'h1', 11, '0.1.0')")
    db.execute("INSERT INTO reactor.reactors (id, hostname, pid, version, heartbeat_at) "
               "VALUES ('r-dead', 'h2', 22, '0.1.0', now() - interval '10 minutes')")
    oldest = insert(db, "doubt", priority="low")
    db.execute("UPDATE reactor.jobs SET created_at = now() - interval '5 minutes' WHERE id = %s", (oldest,))
    insert(db, "doubt", priority="high")
    insert(db, "topic_short")
    claim(db)  # with the default limits all three start; put two back
    db.execute("UPDATE reactor.jobs SET status = 'queued' WHERE priority <> 'high'")
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 6, peak_worker_multiplier = 2, "
               "peak_hour_start = (now() AT TIME ZONE 'UTC' - interval '1 hour')::time, "
               "peak_hour_end = (now() AT TIME ZONE 'UTC' + interval '1 hour')::time")

    st = run_json(capsys, "status", "--dsn", dsn)
    assert (st["stats"]["queued"], st["stats"]["processing"]) == (2, 1)
    assert st["limits"] == {"max_renders": 12, "max_manim": 8, "peak": True, "paused": False}
    assert [r["id"] for r in st["reactors_alive"]] == ["r-alive"]
    assert [r["id"] for r in st["reactors_silent"]] == ["r-dead"]
    assert st["oldest_queued"]["id"] == str(oldest)
    assert st["oldest_queued"]["age_seconds"] >= 300
    assert st["pause"] is None

    assert run(capsys, "pause", "--dsn", dsn)[0] == 0
    st = run_json(capsys, "status", "--dsn", dsn)
    assert st["limits"]["paused"] is True and st["limits"]["max_renders"] == 0
    assert st["pause"]["previous"] == 6 and st["pause"]["paused_by"].startswith("cli:")
    rc, out, _ = run(capsys, "status", "--dsn", dsn)
    assert rc == 0
    assert "PAUSED since" in out and "restores 6" in out
    assert "1 alive" in out and "r-alive on h1" in out and "silent: r-dead" in out
    assert f"oldest     {oldest} doubt (low)" in out
    assert "RENDER FARM UNREACHABLE" not in out
    # a reactor whose circuit is open says so (the circuit breaker publishes it there)
    db.execute("UPDATE reactor.reactors SET circuit_state = 'open', circuit_since = now() WHERE id = 'r-alive'")
    rc, out, _ = run(capsys, "status", "--dsn", dsn)
    assert rc == 0 and "RENDER FARM UNREACHABLE for r-alive: circuit open since" in out
    assert run_json(capsys, "status", "--dsn", dsn)["reactors_alive"][0]["circuit_state"] == "open"


# -- retry -------------------------------------------------------------------------------------


def test_retry_one_job_resets_retries_and_clears_the_error(
    dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = insert(db, status="failed", retry_count=3, error_category="API_ERROR", error_message="503",
                    error_details=json.dumps({"status_code": 503}), started_at="2026-01-01T00:00:00Z")
    db.execute("UPDATE reactor.jobs SET run_after = now() + interval '1 hour' WHERE id = %s", (failed,))
    retried = run_json(capsys, "retry", "--dsn", dsn, str(failed))
    assert retried["status"] == "queued" and retried["queue_position"] == 1
    row = job(db, failed)
    assert row["retry_count"] == 0
    assert (row["error_category"], row["error_message"], row["error_details"]) == (None, None, None)
    assert row["started_at"] is None and row["completed_at"] is None
    now = db.execute("SELECT now()").fetchone()
    assert now is not None and row["run_after"] <= now[0]
    assert claim(db) == [failed]  # runnable at once

    cancelled = insert(db, status="cancelled")
    rc, out, _ = run(capsys, "retry", "--dsn", dsn, str(cancelled))
    assert rc == 0 and out.startswith(f"queued {cancelled} again")
    kinds = db.execute("SELECT kind, actor FROM reactor.events WHERE job_id = %s ORDER BY seq", (cancelled,)).fetchall()
    assert kinds[-1][0] == "requeued" and kinds[-1][1].startswith("cli:")


def test_retry_refuses_jobs_that_are_not_failed_or_cancelled(
    dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]
) -> None:
    done = insert(db, status="completed", result=json.dumps({"video_url": "http://x/v.mp4"}))
    before = job(db, done)
    rc, out, err = run(capsys, "retry", "--dsn", dsn, str(done))
    assert (rc, out) == (1, "")
    assert err.strip() == f"reactor: job {done} is completed: only a failed or cancelled job can be retried"
    assert job(db, done) == before

    rc, _, err = run(capsys, "retry", "--dsn", dsn, str(uuid.uuid4()))
    assert rc == 1 and "no job" in err
    rc, _, err = run(capsys, "retry", "--dsn", dsn)
    assert rc == 2 and "--failed-since" in err
    rc, _, err = run(capsys, "retry", "--dsn", dsn, str(done), "--failed-since", "1h")
    assert rc == 2


def test_retry_failed_since(dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    recent = insert(db, status="failed", retry_count=3, error_category="TIMEOUT", error_message="lease expired")
    hour = insert(db, status="failed", error_category="API_ERROR", error_message="500")
    old = insert(db, status="failed", error_category="API_ERROR", error_message="500")
    cancelled = insert(db, status="cancelled")
    db.execute("UPDATE reactor.jobs SET completed_at = now() - interval '10 minutes' WHERE id = %s", (recent,))
    db.execute("UPDATE reactor.jobs SET completed_at = now() - interval '70 minutes' WHERE id = %s", (hour,))
    db.execute("UPDATE reactor.jobs SET completed_at = now() - interval '3 hours' WHERE id = %s", (old,))

    retried = run_json(capsys, "retry", "--dsn", dsn, "--failed-since", "2h")
    assert {r["id"] for r in retried} == {str(recent), str(hour)}
    assert {r["was_category"] for r in retried} == {"TIMEOUT", "API_ERROR"}
    assert [job(db, j)["status"] for j in (recent, hour, old, cancelled)] == ["queued", "queued", "failed", "cancelled"]
    assert job(db, recent)["retry_count"] == 0

    rc, out, _ = run(capsys, "retry", "--dsn", dsn, "--failed-since", "1h30m")
    assert (rc, out.strip()) == (0, "no job failed in the last 1h30m")
    rc, out, _ = run(capsys, "retry", "--dsn", dsn, "--failed-since", "4h")
    assert rc == 0 and out.startswith("queued 1 failed job again:") and str(old) in out

    for bad in ("2 hours", "h", "0m", "-1h"):
        rc, _, err = run(capsys, "retry", "--dsn", dsn, f"--failed-since={bad}")
        assert rc == 2, bad
        assert "duration" in err


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_queued_and_processing(dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    queued = insert(db, "topic_short", priority="low")
    running = insert(db, "doubt", priority="high")
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 1")
    assert claim(db, "r-7") == [running]

    rc, out, _ = run(capsys, "cancel", "--dsn", dsn, str(queued))
    assert rc == 0 and "was queued" in out
    assert job(db, queued)["status"] == "cancelled"

    res = run_json(capsys, "cancel", "--dsn", dsn, str(running))
    assert (res["was"], res["held_by"], res["changed"]) == ("processing", "r-7", True)
    row = job(db, running)
    assert (row["status"], row["locked_by"], row["lease_expires_at"]) == ("cancelled", None, None)
    assert row["completed_at"] is not None

    rc, out, _ = run(capsys, "cancel", "--dsn", dsn, str(running))
    assert (rc, out.strip()) == (0, f"job {running} was cancelled already")


def test_cancel_refuses_finished_jobs(dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    done = insert(db, status="completed")
    failed = insert(db, status="failed")
    before = job(db, done), job(db, failed)
    last_seq = db.execute("SELECT last_seq FROM reactor.counters").fetchone()

    rc, out, err = run(capsys, "cancel", "--dsn", dsn, str(done))
    assert (rc, out) == (1, "")
    assert err.strip() == (f"reactor: job {done} is completed already: only a queued or processing job "
                           "can be cancelled")
    rc, _, err = run(capsys, "cancel", "--dsn", dsn, str(failed))
    assert rc == 1 and "failed already" in err and "reactor retry" in err
    rc, _, err = run(capsys, "cancel", "--dsn", dsn, str(uuid.uuid4()))
    assert rc == 1 and "no job" in err

    assert (job(db, done), job(db, failed)) == before
    assert db.execute("SELECT last_seq FROM reactor.counters").fetchone() == last_seq  # no event either


# -- requeue-stuck -----------------------------------------------------------------------------


def test_requeue_stuck_takes_back_expired_leases(dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "requeue-stuck", "--dsn", dsn)
    assert (rc, out.strip()) == (0, "nothing stuck")

    dead = insert(db)
    alive = insert(db, "topic_short")
    assert set(claim(db, "r-dead")) == {dead, alive}
    db.execute("UPDATE reactor.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (dead,))

    swept = run_json(capsys, "requeue-stuck", "--dsn", dsn)
    assert swept == [{"id": str(dead), "status": "queued", "reason": "lease_expired", "held_by": "r-dead"}]
    row = job(db, dead)
    assert (row["status"], row["retry_count"], row["error_category"]) == ("queued", 1, "TIMEOUT")
    assert job(db, alive)["status"] == "processing"


# -- pause and resume --------------------------------------------------------------------------


def max_renders(db: Conn) -> int:
    row = db.execute("SELECT max_concurrent_renders FROM job_queue_config").fetchone()
    assert row is not None
    return int(row[0])


def test_pause_and_resume_restore_the_previous_limit(
    dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]
) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 7")
    insert(db)

    res = run_json(capsys, "pause", "--dsn", dsn)
    assert res["changed"] is True and res["previous"] == 7
    assert max_renders(db) == 0
    assert claim(db) == []  # paused: nothing starts

    rc, out, _ = run(capsys, "pause", "--dsn", dsn)
    assert rc == 0 and out.startswith("paused already since") and "restores 7" in out
    assert max_renders(db) == 0

    rc, out, _ = run(capsys, "resume", "--dsn", dsn)
    assert (rc, out.strip()) == (0, "resumed: max_concurrent_renders 7 (the value before the pause)")
    assert max_renders(db) == 7
    assert db.execute("SELECT count(*) FROM reactor.paused_limits").fetchone() == (0,)

    rc, out, _ = run(capsys, "resume", "--dsn", dsn)
    assert (rc, out.strip()) == (0, "not paused: max_concurrent_renders is 7")
    assert max_renders(db) == 7


def test_resume_after_a_pause_by_sql_or_config_set_and_with_to(
    dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]
) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 5")
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # the README's emergency stop
    assert run_json(capsys, "resume", "--dsn", dsn)["max_concurrent_renders"] == 5

    assert run(capsys, "config", "set", "--dsn", dsn, "max_concurrent_renders=0")[0] == 0
    res = run_json(capsys, "resume", "--dsn", dsn, "--to", "3")
    assert (res["max_concurrent_renders"], res["source"]) == (3, "--to")
    assert max_renders(db) == 3

    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")
    db.execute("DELETE FROM reactor.paused_limits")  # nothing remembered: the default
    res = run_json(capsys, "resume", "--dsn", dsn)
    assert (res["max_concurrent_renders"], res["source"]) == (10, "default")

    rc, _, err = run(capsys, "resume", "--dsn", dsn, "--to", "0")
    assert rc == 2 and "--to must be 1 or more" in err


# -- config ------------------------------------------------------------------------------------


def config_row(db: Conn) -> dict[str, Any]:
    with db.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM job_queue_config").fetchone()
    assert row is not None
    return row


def test_config_show_and_set(dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    shown = run_json(capsys, "config", "show", "--dsn", dsn)
    assert shown["max_concurrent_renders"] == 10 and shown["event_retention"] == 7 * 86400
    rc, out, _ = run(capsys, "config", "show", "--dsn", dsn)
    assert rc == 0 and "event_retention" in out and "7 days" in out

    rc, out, err = run(capsys, "config", "set", "--dsn", dsn, "max_concurrent_renders=8", "max_manim_renders=3",
                       "peak_hour_start=18:00", "peak_hour_end=22:30", "peak_worker_multiplier=1.5",
                       "timezone=Asia/Kolkata", "event_retention=3 days")
    assert rc == 0, err
    assert "peak_hour_end = 22:30" in out and "event_retention = 3 days" in out
    row = config_row(db)
    assert (row["max_concurrent_renders"], row["max_manim_renders"], row["timezone"]) == (8, 3, "Asia/Kolkata")
    assert str(row["peak_hour_start"]) == "18:00:00" and float(row["peak_worker_multiplier"]) == 1.5

    rc, _, err = run(capsys, "config", "set", "--dsn", dsn, "peak_hour_start=", "peak_hour_end=null")
    assert rc == 0, err
    assert config_row(db)["peak_hour_start"] is None


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        (["max_concurrent_renders=4", "max_manim_renders=lots"],
         'max_manim_renders: invalid input syntax for type integer: "lots"'),
        (["max_concurrent_renders=4", "max_manim_renders=-1"],
         "job_queue_config.max_manim_renders must be 0 or more, got -1"),
        (["max_concurrent_renders=4", "timezone=Mars/Olympus"],
         "job_queue_config.timezone must be a time zone name such as UTC or Asia/Kolkata, got 'Mars/Olympus'"),
        (["max_concurrent_renders=4", "peak_hour_start=18:00"],
         "job_queue_config.peak_hour_end is NULL: peak_hour_start and peak_hour_end must both be set"),
        (["max_concurrent_renders=4", "speed=11"], "unknown setting speed; known: alert_avg_wait_minutes"),
        (["max_concurrent_renders=4", "updated_at=2020-01-01"], "unknown setting updated_at"),
        (["max_concurrent_renders=4", "max_concurrent_renders=5"], "max_concurrent_renders is given twice"),
        (["max_concurrent_renders"], "settings are given as KEY=VALUE"),
        (["supabase.allow_user_high_priority=true"], "unknown setting supabase.allow_user_high_priority"),
    ],
)
def test_config_set_refusals_change_nothing(
    dsn: str, db: Conn, capsys: pytest.CaptureFixture[str], assignments: list[str], message: str
) -> None:
    before = config_row(db)
    rc, out, err = run(capsys, "config", "set", "--dsn", dsn, *assignments)
    assert (rc, out) == (2, "")
    assert err.startswith("reactor: ") and message in err, err
    assert config_row(db) == before


# -- check -------------------------------------------------------------------------------------


def checks(out: str) -> dict[str, tuple[str, str]]:
    """`reactor check`'s lines: name -> (ok/FAIL/skip/-, detail)."""
    found = {}
    for line in out.splitlines():
        mark, name, detail = line.split(None, 2)
        found[name] = (mark, detail)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def orchestrator() -> Iterator[str]:
    """``python -m reactor dev-orchestrator`` as a process; its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reactor", "--log-level", "WARNING", "dev-orchestrator", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the orchestrator double did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_check_passes_against_database_and_orchestrator(
    dsn: str, orchestrator: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, "check", "--dsn", dsn, "--orchestrator-url", orchestrator)
    assert rc == 0, out + err
    assert {name: mark for name, (mark, _) in checks(out).items()} == {
        "dsn": "ok", "database": "ok", "listen": "ok", "migrations": "ok", "orchestrator": "ok"}
    assert list(checks(out)) == ["dsn", "database", "listen", "migrations", "orchestrator"]

    report = run_json(capsys, "check", "--dsn", dsn, "--orchestrator-url", orchestrator + "/")
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == ["dsn", "database", "listen", "migrations", "orchestrator"]


def test_check_fails_for_an_unreachable_or_unhealthy_orchestrator(
    dsn: str, orchestrator: str, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    rc, out, _ = run(capsys, "check", "--dsn", dsn, "--orchestrator-url", nowhere)
    assert rc == 1
    mark, detail = checks(out)["orchestrator"]
    assert mark == "FAIL" and detail.startswith(f"GET {nowhere}/health failed: ConnectError")
    assert checks(out)["listen"][0] == "ok"

    httpx.post(f"{orchestrator}/control", json={"health_status": 503}, timeout=5).raise_for_status()
    rc, out, _ = run(capsys, "check", "--dsn", dsn, "--orchestrator-url", orchestrator)
    assert rc == 1
    assert checks(out)["orchestrator"] == ("FAIL", f"GET {orchestrator}/health answered 503, not 2xx")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda dsn: dsn.rsplit(":", 1)[0] + ":6543/" + dsn.rsplit("/", 1)[1],
        lambda dsn: dsn + "?pgbouncer=true",
        lambda dsn: dsn + "?sslmode=disable&pgbouncer=true",
    ],
    ids=["port-6543", "pgbouncer", "pgbouncer-second-param"],
)
def test_check_refuses_a_transaction_pooler(dsn: str, capsys: pytest.CaptureFixture[str], mangle: Any) -> None:
    rc, out, _ = run(capsys, "check", "--dsn", mangle(dsn))
    assert rc == 1
    mark, detail = checks(out)["dsn"]
    assert mark == "FAIL"
    assert detail.startswith("this DSN goes through a transaction-mode pooler")
    assert "LISTEN/NOTIFY does not work there" in detail and "port 5432" in detail
    assert checks(out)["database"] == ("skip", "not tried: fix the DSN first")


@pytest.mark.parametrize(
    "mangle",
    [lambda dsn: dsn.rsplit(":", 1)[0] + ":6543/" + dsn.rsplit("/", 1)[1], lambda dsn: dsn + "?pgbouncer=true"],
    ids=["port-6543", "pgbouncer"],
)
def test_run_refuses_a_transaction_pooler(capsys: pytest.CaptureFixture[str], mangle: Any) -> None:
    # refused before any connection is tried: nothing listens on these
    dsn = "postgresql://reactor@127.0.0.1:5/reactor"
    rc, _, err = run(capsys, "run", "--dsn", mangle(dsn), "--orchestrator-url", "http://127.0.0.1:9")
    assert rc == 2
    assert err.startswith("reactor: not starting: this DSN goes through a transaction-mode pooler")
    assert "--allow-pooler-port" in err


def test_check_fails_when_notify_never_arrives(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # what a transaction pooler on another port does: LISTEN is accepted, nothing ever arrives
    monkeypatch.setattr(psycopg.Connection, "notifies", lambda self, **kw: iter(()))
    rc, out, _ = run(capsys, "check", "--dsn", dsn, "--listen-timeout", "0.2")
    assert rc == 1
    mark, detail = checks(out)["listen"]
    assert mark == "FAIL" and "did not arrive within 0.2 s" in detail and "port 5432" in detail


def test_check_fails_with_pending_migrations_and_an_unreachable_database(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    migrate_down(dsn, to_version=1)
    rc, out, _ = run(capsys, "check", "--dsn", dsn)
    assert rc == 1
    later = ", ".join(f"{m.version:04d}_{m.name}" for m in discover() if m.version > 1)
    assert checks(out)["migrations"] == ("FAIL", f"not applied: {later}: run `reactor migrate`")
    rc, _, err = run(capsys, "pause", "--dsn", dsn)  # pause needs 0002
    assert rc == 2 and "run `reactor migrate`" in err

    rc, out, _ = run(capsys, "check", "--dsn", f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    assert rc == 1
    mark, detail = checks(out)["database"]
    assert mark == "FAIL" and detail.startswith("cannot connect to the database: ")


@pytest.mark.parametrize(
    ("dsn", "pooled"),
    [
        ("postgresql://u:p@aws-0-eu.pooler.supabase.com:6543/postgres", True),
        ("postgresql://u:p@aws-0-eu.pooler.supabase.com:5432/postgres", False),
        ("postgresql://u:p@db.abc.supabase.co:5432/postgres?pgbouncer=true", True),
        ("postgresql://u:p@db.abc.supabase.co/postgres?pgbouncer=false", False),
        ("postgresql://u:p@h1:5432,h2:6543/postgres", True),
        ("host=db port=6543 dbname=postgres", True),
        ("host=db port=5432 dbname=postgres pgbouncer=true", True),
        ("host=db dbname=postgres", False),
    ],
)
def test_transaction_pooler_reason(dsn: str, pooled: bool) -> None:
    assert (transaction_pooler_reason(dsn) is not None) is pooled


# -- as a process ------------------------------------------------------------------------------


def test_commands_as_a_process(dsn: str, db: Conn) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DATABASE_URL"] = dsn  # the environment instead of --dsn
    submitted = subprocess.run(
        [sys.executable, "-m", "reactor", "submit", "--type", "doubt", "--input", "What is entropy?", "--json"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]

    status = subprocess.run([sys.executable, "-m", "reactor", "status", "--json"],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["stats"]["queued"] == 1

    db.execute("UPDATE reactor.jobs SET status = 'completed' WHERE id = %s", (job_id,))
    cancel = subprocess.run([sys.executable, "-m", "reactor", "cancel", job_id],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert (cancel.returncode, cancel.stdout) == (1, "")
    assert cancel.stderr.strip().endswith(
        f"reactor: job {job_id} is completed already: only a queued or processing job can be cancelled")


# -- schedules ------------------------------------------------------------------------------------


def test_schedules_list_enable_disable_run_now(dsn: str, db: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "schedules", "--dsn", dsn)
    assert (rc, out.strip()) == (0, "no schedules (add one with INSERT INTO job_schedules)")
    db.execute("INSERT INTO job_schedules (name, cron, timezone, job_type, payload) "
               "VALUES ('digest', '0 6 * * *', 'Asia/Kolkata', 'daily_ca', '{\"date\": \"{{date}}\"}')")
    rc, out, _ = run(capsys, "schedules", "list", "--dsn", dsn)
    assert rc == 0 and "digest" in out and "0 6 * * *" in out and "Asia/Kolkata" in out
    [row] = run_json(capsys, "schedules", "--dsn", dsn)
    assert row["name"] == "digest" and row["enabled"] is True and row["next_run_at"] is not None

    rc, out, _ = run(capsys, "schedules", "disable", "--dsn", dsn, "digest")
    assert (rc, out.strip()) == (0, "schedule digest disabled")
    assert db.execute("SELECT enabled, next_run_at FROM job_schedules").fetchone() == (False, None)
    rc, out, _ = run(capsys, "schedules", "enable", "--dsn", dsn, "digest")
    assert rc == 0 and out.startswith("schedule digest enabled; next run ")

    job = run_json(capsys, "schedules", "run-now", "--dsn", dsn, "digest")
    assert job["schedule_name"] == "digest" and job["idempotency_key"].startswith("schedule:digest:")
    assert job["payload"]["date"] == db.execute(
        "SELECT to_char(now() AT TIME ZONE 'Asia/Kolkata', 'YYYY-MM-DD')").fetchone()[0]  # type: ignore[index]
    actor = db.execute("SELECT actor FROM job_events WHERE job_id = %s", (job["id"],)).fetchone()
    assert actor is not None and actor[0].startswith("cli:")

    for command in ("enable", "disable", "run-now"):
        rc, out, err = run(capsys, "schedules", command, "--dsn", dsn, "nope")
        assert (rc, out, err.strip()) == (1, "", "reactor: no schedule 'nope'")
