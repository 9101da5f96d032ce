"""The feed's own small pool, so that feed reads never queue behind (or ahead of) claims.

Named queries of ``sql/feed.sql``, read-only. Rows come back as dicts; every psycopg error leaves
as a :class:`~reactor.core.errors.DatabaseError` (reactor.db.store.database_errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import anyio
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from reactor.core.errors import DatabaseError
from reactor.db.sqlfiles import load_queries
from reactor.db.store import connect_kwargs, database_errors

__all__ = ["FeedStore"]

#: what the dashboard's ``status`` request reads, in one read-only transaction
_STATUS_SQL = {
    "alerts": """
        SELECT name AS alert, 'firing' AS status, value, threshold, since, changed_by AS reactor
          FROM reactor.alerts WHERE firing ORDER BY since, name""",
    "circuits": """
        SELECT id AS reactor, circuit_state AS circuit, circuit_since AS since
          FROM reactor.reactors
         WHERE circuit_state <> 'closed' AND heartbeat_at >= now() - interval '90 seconds'
         ORDER BY circuit_since NULLS LAST, id""",
    "config": """
        SELECT max_concurrent_renders, max_manim_renders, peak_hour_start, peak_hour_end,
               peak_worker_multiplier, timezone, job_timeout_minutes
          FROM public.job_queue_config""",
    "pause": """
        SELECT max_concurrent_renders AS previous, paused_at, paused_by FROM reactor.paused_limits""",
    "stats": "SELECT * FROM public.get_queue_stats()",
    "schedules": """
        SELECT name, cron, timezone, job_type, priority, enabled, catch_up, next_run_at, last_run_at,
               jobs_created
          FROM public.job_schedules ORDER BY next_run_at NULLS LAST, name LIMIT 50""",
}


class FeedStore:
    """The feed's pool and its named queries."""

    def __init__(self, dsn: str, size: int) -> None:
        self._q = load_queries("feed.sql")
        self._ops = load_queries("ops.sql")
        self.pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=size, kwargs={**connect_kwargs(), "application_name": "reactor feed"},
            check=AsyncConnectionPool.check_connection, open=False, name="feed",
        )

    async def open(self) -> None:
        with database_errors():
            await self.pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        await self.pool.close()

    async def rows(self, name: str, params: Mapping[str, Any] | None = None,
                   wait_s: float = 30.0) -> list[dict[str, Any]]:
        with database_errors():
            async with self.pool.connection(timeout=wait_s) as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(self._q[name], params or {})
                return await cur.fetchall()

    async def snapshot(self, user_id: UUID | None, jobs: int, queue: int) -> dict[str, Any]:
        """Stats, recent jobs and the queue's head (or a user's own jobs), as of one seq: ``seq``,
        ``stats`` (None for a user), ``jobs`` and ``queue`` (rows)."""
        with database_errors():
            async with self.pool.connection() as conn, conn.transaction(), \
                    conn.cursor(row_factory=dict_row) as cur:
                await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                if user_id is None:
                    await cur.execute(self._q["feed_stats"])
                    stats = await cur.fetchone()
                    assert stats is not None
                    seq, stats_out = int(stats["last_seq"]), dict(stats)
                    await cur.execute(self._q["feed_recent_jobs"], {"limit": jobs})
                    recent = await cur.fetchall()
                    await cur.execute(self._q["feed_queue_head"], {"limit": queue})
                    head = await cur.fetchall()
                else:
                    await cur.execute(self._q["feed_bounds"])
                    bounds = await cur.fetchone()
                    assert bounds is not None
                    seq, stats_out = int(bounds["last_seq"]), None
                    await cur.execute(self._q["feed_user_jobs"], {"user_id": user_id, "limit": jobs})
                    recent = await cur.fetchall()
                    await cur.execute(self._q["feed_user_queue"], {"user_id": user_id, "limit": queue})
                    head = await cur.fetchall()
        return {"seq": seq, "stats": stats_out, "jobs": recent, "queue": head}

    async def read_only(self, statements: Mapping[str, str], params: Mapping[str, Any],
                        wait_s: float) -> dict[str, list[dict[str, Any]]]:
        """Several reads in one read-only transaction (the dashboard's requests)."""
        out: dict[str, list[dict[str, Any]]] = {}
        with database_errors():
            async with self.pool.connection(timeout=wait_s) as conn, conn.transaction(), \
                    conn.cursor(row_factory=dict_row) as cur:
                await cur.execute("SET TRANSACTION READ ONLY")
                for name, statement in statements.items():
                    await cur.execute(statement, params)
                    out[name] = await cur.fetchall()
        return out

    async def job_and_events(self, job_id: UUID, wait_s: float) -> dict[str, list[dict[str, Any]]]:
        """``job`` (one row or none) and ``events`` (its history), read together."""
        return await self.read_only({"job": self._ops["get_job"], "events": self._ops["job_events"]},
                                    {"id": job_id}, wait_s)

    async def status(self, wait_s: float) -> dict[str, list[dict[str, Any]]]:
        """What the dashboard's ``status`` request shows: ``alerts``, ``circuits``, ``config``,
        ``pause``, ``stats``, ``schedules`` (the next to run first)."""
        return await self.read_only(_STATUS_SQL, {}, wait_s)

    async def ping(self, wait_s: float) -> str | None:
        """None if the database answers within ``wait_s``, else why not."""
        try:
            with anyio.fail_after(wait_s):
                await self.rows("feed_ping", wait_s=wait_s)
        except TimeoutError:
            return "no answer"
        except DatabaseError as exc:
            cause = exc.__cause__ or exc
            return " ".join(str(cause).split())[:200] or type(cause).__name__
        return None
