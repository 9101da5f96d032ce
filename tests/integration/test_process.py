"""Real reactor processes and real failures: SIGKILL, SIGTERM drains, a killed LISTEN backend, a
restarted PostgreSQL, and what an idle reactor costs the database.

The reactors under test run as ``python -m reactor run ...`` subprocesses (their log goes to a file
that every assertion message carries) or in-process where the test needs the Service object. The
orchestrator double runs in the test's event loop, so every wait here is an async poll.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from reactor.db.embedded import FAST_SETTINGS, EmbeddedPostgres
from reactor.db.migrations import migrate_up
from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.processes import (
    Conn,
    ReactorProcess,
    jobs_state,
    reactor_process,
    scalar,
    status_count,
    until,
)
from tests.support.reactors import running_reactor, wait_for

pytestmark = pytest.mark.anyio

logger = logging.getLogger(__name__)

RecordProperty = Callable[[str, object], None]

# -- database helpers (the generic ones live in tests/support/processes.py) -------------------------


def insert(conn: Conn, text: str = "Photosynthesis", job_type: str = "topic_short") -> str:
    field = {"doubt": "question", "topic_short": "topic", "daily_ca": "date"}[job_type]
    row = conn.execute(
        "INSERT INTO jobs (job_type, payload) VALUES (%s, %s) RETURNING id", (job_type, json.dumps({field: text})),
    ).fetchone()
    assert row
    return str(row[0])


def job_row(conn: Conn, job_id: str) -> dict[str, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute(
            "SELECT id, status, retry_count, attempt, locked_by, lease_expires_at, error_category, error_message "
            "FROM reactor.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row, job_id
    return row


def events(conn: Conn, job_id: str) -> list[tuple[str, str, int, str | None]]:
    return [
        (r[0], r[1], r[2], r[3]) for r in conn.execute(
            "SELECT kind, actor, retry_count, error_category FROM job_events WHERE job_id = %s ORDER BY seq",
            (job_id,))
    ]


# -- 1. SIGKILL mid-render ------------------------------------------------------------------------


async def test_sigkilled_reactor_jobs_are_rescued_by_another(
    dsn: str, db: Conn, tmp_path: Path, record_property: RecordProperty,
) -> None:
    async with OrchestratorDouble() as orch:
        orch.configure(latency_ms=60000)  # every render hangs for a minute
        with reactor_process(dsn, orch.url, tmp_path, "proc-a", "--lease-seconds", "3") as a:
            await a.wait_ready()
            rendering = [insert(db, f"rescue me {i}") for i in range(3)]
            await until(
                lambda: scalar(db, "SELECT count(*) FROM reactor.jobs WHERE status = 'processing' "
                                   "AND locked_by = 'proc-a'") == 3 and orch.stats()["in_flight"] == 3,
                "3 jobs rendering at reactor A", diag=a.diag)
            killed_at = time.monotonic()
            a.send(signal.SIGKILL)
            assert await a.wait_exit(10) == -signal.SIGKILL
        # A is gone without a word: its jobs still say processing, held by A
        assert scalar(db, "SELECT count(*) FROM reactor.jobs WHERE status = 'processing' "
                          "AND locked_by = 'proc-a'") == 3
        queued_meanwhile = [insert(db, f"while nobody runs {i}") for i in range(2)]
        orch.configure(latency_ms=0)
        with reactor_process(dsn, orch.url, tmp_path, "proc-b",
                             "--lease-seconds", "3", "--sweep-seconds", "30") as b:
            await until(lambda: status_count(db, "completed") == 5, "all 5 jobs completed by reactor B",
                        diag=lambda: jobs_state(db) + b.diag())
            kill_to_done = time.monotonic() - killed_at
            b_log = b.log(tail=10**7)
            b.send(signal.SIGTERM)
            assert await b.wait_exit() == 0, b.diag()
    record_property("kill_to_completion_s", round(kill_to_done, 2))
    logger.info("SIGKILL -> every rescued job completed: %.2f s", kill_to_done)
    assert kill_to_done < 30, f"rescue took {kill_to_done:.1f} s{b.diag()}"

    # nothing lost, nothing left behind
    assert scalar(db, "SELECT count(*) FROM reactor.jobs") == 5
    assert scalar(db, "SELECT count(*) FROM reactor.jobs WHERE status <> 'completed'") == 0
    for job_id in rendering:
        row = job_row(db, job_id)
        assert (row["retry_count"], row["attempt"], row["locked_by"]) == (1, 2, None), row
        kinds = events(db, job_id)
        assert [(k, actor) for k, actor, _, _ in kinds] == [
            ("inserted", "sql:postgres"), ("started", "reactor:proc-a"), ("retrying", "reactor:proc-b:sweep"),
            ("started", "reactor:proc-b"), ("completed", "reactor:proc-b"),
        ], kinds
        assert kinds[2][2:] == (1, "TIMEOUT"), kinds  # the retry was spent, as a TIMEOUT
        # the sweep of B took it back because A's lease expired (the events keep no message: the log does)
        swept = [line for line in b_log.splitlines()
                 if 'msg="job taken back by the sweep"' in line and f"job_id={job_id}" in line]
        assert len(swept) == 1, f"no sweep line for {job_id}{b.diag()}"
        assert "reason=lease_expired" in swept[0] and "held_by=proc-a" in swept[0], swept[0]
        tries = [r for r in orch.requests if r["job_id"] == job_id]
        assert [r["aborted"] for r in tries] == [True, False], tries
    for job_id in queued_meanwhile:
        assert [k for k, _, _, _ in events(db, job_id)] == ["inserted", "started", "completed"]
        assert job_row(db, job_id)["retry_count"] == 0


# -- 2-4. SIGTERM drains --------------------------------------------------------------------------


async def wait_rendering(db: Conn, orch: OrchestratorDouble, rp: ReactorProcess, job_id: str) -> None:
    await until(
        lambda: scalar(db, "SELECT locked_by FROM reactor.jobs WHERE id = %s AND status = 'processing'",
                       (job_id,)) == rp.reactor_id and orch.stats()["in_flight"] == 1,
        f"job {job_id} rendering at {rp.reactor_id}", diag=rp.diag)
    await until(lambda: scalar(db, "SELECT count(*) FROM reactor.reactors WHERE id = %s", (rp.reactor_id,)) == 1,
                f"{rp.reactor_id} registered in reactor.reactors", diag=rp.diag)


async def test_sigterm_lets_a_render_finish_within_the_grace(
    dsn: str, db: Conn, tmp_path: Path, record_property: RecordProperty,
) -> None:
    async with OrchestratorDouble() as orch:
        with reactor_process(dsn, orch.url, tmp_path, "drain-ok", "--drain-seconds", "20") as rp:
            await rp.wait_ready()
            job_id = insert(db, "[[latency=1500]] takes a while")
            await wait_rendering(db, orch, rp, job_id)
            assert orch.requests[0]["answered_at"] is None
            term_at = time.monotonic()
            rp.send(signal.SIGTERM)
            rc = await rp.wait_exit()
            took = time.monotonic() - term_at
            assert rc == 0, rp.diag()
    record_property("sigterm_to_exit_s", round(took, 2))
    [req] = orch.requests
    # the render was answered, not cut off, and its outcome was written before the process exited
    assert req["aborted"] is False and req["answered_at"] is not None, req
    row = job_row(db, job_id)
    assert row["status"] == "completed", f"{row}{rp.diag()}"
    assert row["retry_count"] == 0
    assert status_count(db, "processing") == 0
    assert scalar(db, "SELECT count(*) FROM reactor.reactors WHERE id = 'drain-ok'") == 0, rp.diag()
    log = rp.log(tail=10**7)
    assert "draining" in log and 'msg="reactor stopped"' in log, rp.diag()


async def test_sigterm_past_the_grace_returns_the_job_without_spending_a_retry(
    dsn: str, db: Conn, tmp_path: Path, record_property: RecordProperty,
) -> None:
    async with OrchestratorDouble() as orch:
        with reactor_process(dsn, orch.url, tmp_path, "drain-late", "--drain-seconds", "1") as rp:
            await rp.wait_ready()
            job_id = insert(db, "[[latency=60000]] far too slow")
            await wait_rendering(db, orch, rp, job_id)
            term_at = time.monotonic()
            rp.send(signal.SIGTERM)
            rc = await rp.wait_exit()
            took = time.monotonic() - term_at
            assert rc == 0, rp.diag()
        await until(lambda: bool(orch.requests[0]["aborted"]), "the double to see the render aborted",
                    timeout=10, diag=rp.diag)
    record_property("sigterm_to_exit_s", round(took, 2))
    assert took < 10, f"exit took {took:.1f} s with a 1 s grace{rp.diag()}"
    row = job_row(db, job_id)
    assert row["status"] == "queued", f"{row}{rp.diag()}"
    assert row["retry_count"] == 0 and row["error_category"] is None, row
    assert row["locked_by"] is None and row["lease_expires_at"] is None, row
    assert "stopped" in (row["error_message"] or ""), row
    assert status_count(db, "processing") == 0
    assert scalar(db, "SELECT count(*) FROM reactor.reactors WHERE id = 'drain-late'") == 0, rp.diag()
    assert [r["job_id"] for r in orch.requests] == [job_id]


async def test_second_sigterm_stops_at_once(
    dsn: str, db: Conn, tmp_path: Path, record_property: RecordProperty,
) -> None:
    async with OrchestratorDouble() as orch:
        with reactor_process(dsn, orch.url, tmp_path, "drain-abort", "--drain-seconds", "60") as rp:
            await rp.wait_ready()
            job_id = insert(db, "[[latency=60000]] slow")
            await wait_rendering(db, orch, rp, job_id)
            rp.send(signal.SIGTERM)
            await rp.wait_log("draining")  # the first signal was taken: the reactor is in its grace
            await anyio.sleep(0.5)
            assert rp.proc.poll() is None, rp.diag()
            second_at = time.monotonic()
            rp.send(signal.SIGTERM)
            rc = await rp.wait_exit(30)
            took = time.monotonic() - second_at
            assert rc == 0, rp.diag()
        await until(lambda: bool(orch.requests[0]["aborted"]), "the double to see the render aborted",
                    timeout=10, diag=rp.diag)
    record_property("second_sigterm_to_exit_s", round(took, 2))
    assert took < 15, f"exit took {took:.1f} s after the second SIGTERM{rp.diag()}"
    assert "second signal" in rp.log(tail=10**7), rp.diag()
    row = job_row(db, job_id)
    assert row["status"] == "queued" and row["retry_count"] == 0 and row["locked_by"] is None, f"{row}{rp.diag()}"
    assert status_count(db, "processing") == 0


# -- 5. the LISTEN backend killed -----------------------------------------------------------------


async def test_killed_listen_backend_reconnects_and_rereads_the_queue(dsn: str, db: Conn) -> None:
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url) as service:
        # first let it settle: one job through, then a quiet moment, so that no claim round of the
        # start-up (or of that job) is still pending when the listener goes
        warm_up = insert(db, "warm-up")
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (warm_up,), expect=lambda s: s == "completed")
        await anyio.sleep(1.0)
        old_pid = service.listener.backend_pid
        assert old_pid is not None and service.listener.reconnects == 0
        assert scalar(db, "SELECT pg_terminate_backend(%s)", (old_pid,)) is True
        # no await in between: the listener cannot have noticed, let alone reconnected, so the NOTIFYs
        # of these inserts reach nobody; only the re-read after the reconnect can find them
        jobs = [insert(db, f"while the listener is down {i}") for i in range(5)]
        took = await until(lambda: status_count(db, "completed") == 6, "the 5 jobs (and the warm-up) completed",
                           timeout=30)
        assert service.listener.reconnects >= 1
        assert service.listener.backend_pid not in (None, old_pid)
        assert service.listener.connected
        # and it still hears NOTIFY after the reconnect
        later = insert(db, "after the reconnect")
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (later,), expect=lambda s: s == "completed")
    logger.info("jobs inserted while the listener was down completed in %.2f s", took)
    assert sorted(r["job_id"] for r in orch.requests) == sorted([warm_up, *jobs, later])


# -- 6. PostgreSQL restarted ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_reactor_survives_a_postgres_restart(mode: str, record_property: RecordProperty) -> None:
    # private: the session server is shared with the other tests. Commits are synchronous here (the
    # fast settings make them asynchronous, and an immediate shutdown could then lose the last
    # ~0.6 s of commits, the migration or the test's inserts included); the reactor's own sessions
    # still commit asynchronously, as it chooses to.
    server = EmbeddedPostgres(settings={**FAST_SETTINGS, "synchronous_commit": "on"})
    try:
        pg_dsn = await anyio.to_thread.run_sync(server.start)
        await anyio.to_thread.run_sync(migrate_up, pg_dsn)

        def completed() -> int:
            with psycopg.connect(pg_dsn, autocommit=True, connect_timeout=5) as conn:
                return status_count(conn, "completed")

        def add(n: int, text: str) -> list[str]:
            with psycopg.connect(pg_dsn, autocommit=True, connect_timeout=5) as conn:
                return [insert(conn, f"{text} {i}") for i in range(n)]

        async with OrchestratorDouble() as orch, running_reactor(pg_dsn, orch.url) as service:
            [before] = await anyio.to_thread.run_sync(add, 1, "before")
            await until(lambda: completed() == 1, "the first job completed")
            await anyio.to_thread.run_sync(server.restart, mode)
            back_at = time.monotonic()
            after = await anyio.to_thread.run_sync(add, 3, "after")
            await until(lambda: completed() == 4, f"jobs after a {mode} restart completed",
                        diag=lambda: f"\nlistener connected={service.listener.connected} "
                                     f"reconnects={service.listener.reconnects}")
            recovery = time.monotonic() - back_at
            assert service.listener.reconnects >= 1
            assert service.listener.connected
            assert not service.stopping
        record_property(f"restart_{mode}_recovery_s", round(recovery, 2))
        logger.info("after a %s restart, new jobs completed %.2f s after the server was back", mode, recovery)
        renders = [r["job_id"] for r in orch.requests]
        assert all(renders.count(j) == 1 for j in after), renders
        if mode == "fast":
            assert renders.count(before) == 1, renders
        else:
            # the reactor commits asynchronously (reactor/db/store.py): a crash may lose the last few hundred
            # ms of its commits, here maybe the first job's outcome, which is then rendered again
            assert renders.count(before) in (1, 2), renders
            record_property("restart_immediate_rerendered", renders.count(before) - 1)
    finally:
        await anyio.to_thread.run_sync(server.destroy)


# -- 7. idle cost ---------------------------------------------------------------------------------


@pytest.mark.slow  # ~45 s: the counts of PostgreSQL's statistics can lag by 10 s (see below)
async def test_an_idle_reactor_costs_almost_no_transactions(record_property: RecordProperty) -> None:
    """Transactions an idle reactor causes in 30 s, from pg_stat_database.

    Three things make the count honest:
    - a private server with autovacuum off: an autovacuum worker's visits count in xact_commit of
      the database it visits (about 2 a visit), which on the shared server would land in the window
      by chance;
    - the counts are read from a connection to another database, so reading adds nothing;
    - a backend whose transaction ends within 1 s of its last stats flush keeps the count pending
      for up to 10 s (PGSTAT_IDLE_INTERVAL) unless it gets busy again, so each read is taken more
      than 10 s after the reactor's last burst: 12 s after start, and 30 s later, that is 12 s after
      the sweep that falls in the window (the sweep runs at start and every 30 s).
    """
    window_s, quiet_s = 30.0, 12.0
    server = EmbeddedPostgres(settings={**FAST_SETTINGS, "autovacuum": "off"})
    try:
        maintenance_dsn = await anyio.to_thread.run_sync(server.start)
        with psycopg.connect(maintenance_dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE idle_reactor")
        dsn = server.dsn_for("idle_reactor")
        await anyio.to_thread.run_sync(migrate_up, dsn)

        async def xacts(conn: psycopg.AsyncConnection[Any]) -> int:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            cur = await conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'idle_reactor'")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        async with (
            await psycopg.AsyncConnection.connect(maintenance_dsn, autocommit=True) as meter,
            OrchestratorDouble() as orch,
            running_reactor(dsn, orch.url) as service,
        ):
            await anyio.sleep(quiet_s)
            before = await xacts(meter)
            started = time.monotonic()
            await anyio.sleep(window_s)
            after = await xacts(meter)
            elapsed = time.monotonic() - started
            assert not service.dispatcher.inflight and service.listener.connected
        spent = after - before
        record_property("idle_transactions_per_30s", spent)
        logger.info("idle reactor: %d transactions in %.1f s", spent, elapsed)
        assert orch.requests == []
        assert spent <= 3, f"{spent} transactions in {elapsed:.0f} idle seconds (at most 6 a minute expected)"
    finally:
        await anyio.to_thread.run_sync(server.destroy)
