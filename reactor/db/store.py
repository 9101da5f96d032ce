"""Database access for the service: a connection pool and the named queries of sql/queries.sql.

Callers get reactor errors, never psycopg's: :func:`database_errors` turns an outage (a lost
connection, a deadlock, a serialization failure, a shutdown) into
:class:`~reactor.core.errors.DatabaseUnavailable` (``DatabaseTimeout`` when no connection was free
in time), anything else the database refuses into :class:`~reactor.core.errors.StatementRefused`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from reactor import __version__
from reactor.core.errors import DatabaseError, DatabaseTimeout, DatabaseUnavailable, StatementRefused
from reactor.core.models import CacheDecision, ClaimedJob, Outcome, RenderRequest
from reactor.core.policy import DEFAULT_RENDER_OPTIONS
from reactor.db import pgtypes
from reactor.db.sqlfiles import load_queries

__all__ = ["TRANSIENT_ERRORS", "Database", "connect_kwargs", "database_errors", "one_line", "sanitize_json"]

logger = logging.getLogger(__name__)

#: the render options a job gets when neither its payload nor its type says: the claim resolves a
#: cacheable job's request with them, as build_request() does (reactor.render_cache_request)
_RENDER_FALLBACK = json.dumps(DEFAULT_RENDER_OPTIONS)

# rows are user input: no value read from the database may raise while a result is fetched
pgtypes.install()

#: errors after which the same statement may simply be tried again (for this layer only: callers
#: catch DatabaseUnavailable)
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.AdminShutdown,
)


@contextlib.contextmanager
def database_errors(what: str = "") -> Iterator[None]:
    """psycopg's errors out of the block as the reactor's: ``DatabaseTimeout`` (no connection free in
    time), ``DatabaseUnavailable`` (an outage: worth trying again), else ``StatementRefused``
    (``what`` refused: the same statement would fail again). The message is psycopg's."""
    try:
        yield
    except PoolTimeout as exc:
        raise DatabaseTimeout(str(exc)) from exc
    except TRANSIENT_ERRORS as exc:
        raise DatabaseUnavailable(str(exc)) from exc
    except psycopg.Error as exc:
        raise StatementRefused(f"the database refused {what}: {one_line(exc)}" if what else str(exc)) from exc


def connect_kwargs() -> dict[str, Any]:
    """Connection options: TCP keepalives so a dead peer is noticed, and a short connect timeout."""
    return {
        "autocommit": True,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "connect_timeout": 10,
    }


class Database:
    """The reactor's pool. Every write is one autocommit statement."""

    def __init__(self, dsn: str, reactor_id: str, *, min_size: int = 1, max_size: int = 8) -> None:
        self.dsn = dsn
        self.reactor_id = reactor_id
        self._q = load_queries()
        #: a sweep looks at leases from this floor on (and prunes events and totals from where the
        #: last prune stopped): below it an earlier sweep looked. Under a pinned MVCC horizon the
        #: lease index keeps an entry for every job that passed through processing, and no scan may
        #: drop one; from the floor, a sweep visits only those of its last few seconds. None: all.
        self._sweep_floor: datetime | None = None
        self._totals_from = 0
        #: finished jobs are pruned from this completed_at on (the newest one the last batch deleted)
        self._prune_floor: datetime | None = None
        #: a live lease below the floor (a claim that committed long after it began, a job the
        #: sweep skipped because it was locked) is found by the next full sweep
        self._full_sweep_at = 0.0
        #: the dispatcher's own connection, outside the pool: a claim then waits for no pool
        #: checkout, and lands on a backend that served the previous one (opened on first use)
        self._dispatch_conn: psycopg.AsyncConnection[Any] | None = None
        self.pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            kwargs=connect_kwargs(),
            configure=self._configure,
            open=False,
            name="reactor",
        )

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(
            "SELECT set_config('reactor.actor', %s, false), set_config('application_name', %s, false)",
            (f"reactor:{self.reactor_id}", f"reactor {self.reactor_id}"),
        )

    async def open(self, wait_s: float = 30.0) -> None:
        try:
            await self.pool.open(wait=True, timeout=wait_s)
        except Exception as exc:
            raise DatabaseError(f"cannot connect to the database: {exc}") from exc

    async def close(self) -> None:
        conn, self._dispatch_conn = self._dispatch_conn, None
        if conn is not None:
            await conn.close()
        await self.pool.close()

    async def _fetch(self, conn: psycopg.AsyncConnection[Any], name: str,
                     params: dict[str, Any]) -> list[dict[str, Any]]:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(self._q[name], params)
            return await cur.fetchall() if cur.description else []

    async def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        with database_errors():
            async with self.pool.connection() as conn:
                return await self._fetch(conn, name, params)

    async def _dispatch_rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """``_rows`` on the dispatcher's own connection, (re)opened when it is missing or unusable.

        Only the dispatcher's loop calls this, one statement at a time. A connection left broken,
        closed or not idle (a lost server, a cancelled statement) is closed here and replaced, so a
        database restart costs one failed statement, which the dispatcher retries.
        """
        conn = self._dispatch_conn
        if conn is None or conn.broken or conn.closed or (
            conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        ):
            self._dispatch_conn = None
            try:
                if conn is not None:
                    await conn.close()
                conn = await psycopg.AsyncConnection.connect(self.dsn, **connect_kwargs())
                pgtypes.guard_payloads(conn)  # a payload past the limits reads as Undecodable
                await self._configure(conn)
            except TRANSIENT_ERRORS as exc:
                raise DatabaseUnavailable(str(exc)) from exc
            self._dispatch_conn = conn
        try:
            return await self._fetch(conn, name, params)
        except TRANSIENT_ERRORS as exc:
            raise DatabaseUnavailable(str(exc)) from exc
        except psycopg.Error as exc:
            raise StatementRefused(f"the database refused {name}: {one_line(exc)}") from exc

    # -- dispatch --------------------------------------------------------------------------------

    async def finish_and_claim(
        self, outcomes: Sequence[Outcome], max_jobs: int, lease_s: float, clock: datetime
    ) -> tuple[set[UUID], list[ClaimedJob]]:
        """Record outcomes whose lease we still hold, then claim up to ``max_jobs``: one round trip.

        Returns the ids whose outcome was written, and the jobs claimed. Raises
        :class:`StatementRefused` when the database refuses the statement itself (not an outage).
        """
        batch = [
            sanitize_json({
                "id": str(o.job_id), "attempt": o.attempt, "status": o.status, "result": o.result,
                "retry_count": o.retry_count, "delay_s": o.delay_seconds,
                "error_category": o.error_category, "error_message": o.error_message,
                "error_details": o.error_details, "cache_key": o.cache_key,
            })
            for o in outcomes
        ]
        rows = await self._dispatch_rows("finish_and_claim", {
            "batch": json.dumps(batch, default=str), "reactor": self.reactor_id, "max": max_jobs,
            "lease_s": lease_s, "clock": clock, "fallback": _RENDER_FALLBACK,
        })
        written = {r["id"] for r in rows if r["written"]}
        claimed = [
            ClaimedJob(
                id=r["id"], job_type=r["job_type"], priority=r["priority"], payload=r["payload"],
                user_id=r["user_id"], renderer=r["renderer"], retry_count=r["retry_count"],
                max_retries=r["max_retries"], attempt=r["attempt"], created_at=r["created_at"],
                input_field=r["input_field"], type_defaults=r["type_defaults"],
                timeout_minutes=r["timeout_minutes"], cache_key=r.get("cache_key"),
                cache_state=r.get("cache_state"),
            )
            for r in rows
            if not r["written"]
        ]
        return written, claimed

    async def cache_take(self, job: ClaimedJob, request: RenderRequest, key: str, wait_s: float) -> CacheDecision:
        """Ask the render cache about a job this reactor holds, before rendering it
        (``reactor.render_cache_take``): render it, complete it from a render younger than its type's
        TTL (hit), or let it wait for the job rendering the same request now (the job is queued again).
        Asked only when the claim did not settle it (``ClaimedJob.cache_state`` other than render)."""
        rows = await self._rows("render_cache_take", {
            "job": job.id, "attempt": job.attempt, "reactor": self.reactor_id, "key": key,
            "request": json.dumps({"job_type": request.job_type, "input": request.input, "style": request.style,
                                   "length": request.length, "voice": request.voice}),
            "wait_s": wait_s,
        })
        row = rows[0] if rows else {}
        result = row.get("result")
        return CacheDecision(str(row.get("decision") or "render"), row.get("source"),
                             result if isinstance(result, dict) else None)

    async def release_strays(self, known: set[UUID], free_requeues: int, reason: str) -> list[dict[str, Any]]:
        """Put back jobs this reactor holds but does not know of (a claim whose answer could not be
        read, a dispatcher that restarted): queued again without spending a retry, or failed once
        ``free_requeues`` are spent, so a job that breaks every read cannot loop. ``reason`` becomes
        their error message. Returns their id and new status."""
        return await self._rows("release_strays", {
            "reactor": self.reactor_id, "known": list(known), "free": free_requeues, "reason": reason[:500],
        })

    async def renew(self, held: dict[UUID, int], lease_s: float) -> set[UUID]:
        """Extend the leases we hold; returns the ids still ours."""
        if not held:
            return set()
        rows = await self._rows("renew_leases", {
            "ids": list(held), "attempts": list(held.values()), "lease_s": lease_s,
            "reactor": self.reactor_id,
        })
        return {r["id"] for r in rows}

    async def still_held(self, held: dict[UUID, int]) -> set[UUID]:
        if not held:
            return set()
        rows = await self._rows("still_held", {
            "ids": list(held), "attempts": list(held.values()), "reactor": self.reactor_id,
        })
        return {r["id"] for r in rows}

    # -- sweep -----------------------------------------------------------------------------------

    #: how far below the last sweep's clock the next one starts looking at leases
    SWEEP_FLOOR_MARGIN = timedelta(seconds=10)
    #: seconds between sweeps that look at every lease (the first sweep does too)
    FULL_SWEEP_EVERY_S = 300.0
    #: retention (job_queue_config.job_retention): after each sweep, finished jobs past it are deleted
    #: in batches of PRUNE_BATCH rows, each its own short transaction (its locks are held that long),
    #: at most PRUNE_BATCHES per sweep and no more once PRUNE_BUDGET_S has gone by (a busy server
    #: makes batches slow: the sweep then leaves the rest for the next one)
    PRUNE_BATCH = 1000
    PRUNE_BATCHES = 10
    PRUNE_BUDGET_S = 0.5

    async def sweep(self, grace_s: float, orphan_s: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Requeue what died, prune old events, say we are alive, and read when to look next:
        one transaction. Returns (jobs swept, next wake-up times)."""
        with database_errors():
            return await self._sweep(grace_s, orphan_s)

    async def _sweep(self, grace_s: float, orphan_s: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        full = time.monotonic() >= self._full_sweep_at
        since = None if full else self._sweep_floor
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            # the sweep's own actor: its changes are nobody's outcome, and its NOTIFY must wake
            # this reactor's dispatcher too (which skips notices of its own claims and outcomes)
            await cur.execute("SELECT set_config('reactor.actor', %s, true)",
                              (f"reactor:{self.reactor_id}:sweep",))
            await cur.execute(self._q["sweep"], {"grace_s": grace_s, "orphan_s": orphan_s, "since": since})
            swept = await cur.fetchall()
            await cur.execute(self._q["heartbeat"], {
                "reactor": self.reactor_id, "hostname": socket.gethostname(),
                "pid": os.getpid(), "version": __version__,
            })
            await cur.execute(self._q["prune"], {"since": since, "totals_from": self._totals_from})
            pruned = await cur.fetchone()
            await cur.execute(self._q["forget_dead_reactors"])
            await cur.execute(self._q["next_wakeups"], {"since": since})
            wakeups = await cur.fetchone()
        if wakeups is not None:
            self._sweep_floor = wakeups["db_now"] - self.SWEEP_FLOOR_MARGIN
        if pruned is not None:
            self._totals_from = int(pruned["totals_from"])
        wakeups = dict(wakeups or {})
        wakeups["jobs_pruned"] = await self._prune_jobs(since_floor=not full)
        if full:
            self._full_sweep_at = time.monotonic() + self.FULL_SWEEP_EVERY_S
        return swept, wakeups

    async def _prune_jobs(self, *, since_floor: bool) -> int:
        """Delete finished jobs past their retention, batch after batch (each one transaction), from
        where the last batch stopped (``since_floor``; else from the oldest): under a pinned MVCC
        horizon the jobs deleted before still have their index entries, and no scan may drop them."""
        since = self._prune_floor if since_floor else None
        started = time.monotonic()
        total = 0
        for _ in range(self.PRUNE_BATCHES):
            async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(self._q["prune_jobs"], {"limit": self.PRUNE_BATCH, "since": since})
                row = await cur.fetchone()
            n = int(row["jobs_pruned"]) if row else 0
            total += n
            if row is not None and row["last_completed_at"] is not None:
                since = self._prune_floor = row["last_completed_at"]
            if n < self.PRUNE_BATCH or time.monotonic() - started > self.PRUNE_BUDGET_S:
                break
        return total

    async def next_wakeups(self) -> dict[str, Any]:
        """The earliest delayed job's due time (the dispatcher's question; leases are the sweep's)."""
        rows = await self._rows("next_wakeups", {"since": "infinity"})
        return rows[0]

    # -- schedules -------------------------------------------------------------------------------

    async def fire_schedules(self, now: datetime | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Make the jobs of every schedule slot due (by the database's clock, or ``now``), then read
        the earliest next run: one transaction. Returns (slots acted on, {next_run_at, db_now})."""
        with database_errors():
            async with self.pool.connection() as conn, conn.transaction(), \
                    conn.cursor(row_factory=dict_row) as cur:
                # the scheduler's own actor: the jobs it makes must wake this reactor's dispatcher too
                await cur.execute("SELECT set_config('reactor.actor', %s, true)",
                                  (f"reactor:{self.reactor_id}:schedules",))
                await cur.execute(self._q["fire_schedules"], {"now": now})
                fired = await cur.fetchall()
                await cur.execute(self._q["next_schedule"])
                nxt = await cur.fetchone()
        return fired, nxt or {}

    async def set_circuit(self, state: str, since: datetime | None) -> None:
        await self._rows("set_circuit", {"reactor": self.reactor_id, "state": state, "since": since})

    async def unregister(self) -> None:
        await self._rows("unregister", {"reactor": self.reactor_id})


def sanitize_json(value: Any) -> Any:
    """``value`` with what jsonb cannot store removed: NUL characters and lone surrogates in
    strings, and non-finite numbers (None in their place). Outcomes carry text from the render farm."""
    if isinstance(value, str):
        if value.isascii():
            return value.replace("\x00", "")
        return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {sanitize_json(str(k)): sanitize_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def one_line(exc: BaseException) -> str:
    """An error's message on one line, at most 300 characters (for logs and error messages)."""
    return " ".join(str(exc).split())[:300]
