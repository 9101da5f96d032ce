"""The alert evaluation's database side: one transaction under a fleet-wide advisory lock.

:meth:`AlertStore.evaluation` opens the transaction and takes ``pg_try_advisory_xact_lock``; a
reactor that does not get it gets None and skips this round. Inside, :class:`Evaluation` reads the
figures and the alerts' state, and flips an alert only while its row holds the old state, with the
``NOTIFY reactor_alerts`` in the same transaction (sent only if the flip commits). The rules are
reactor/ops/alerts.py. A missing ``reactor.alerts`` (migration 0003 not applied) leaves as
:class:`~reactor.core.errors.SchemaMissing`; any other failure as a ``DatabaseError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncCursor
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from reactor.core.errors import SchemaMissing
from reactor.db.store import database_errors

__all__ = ["LOCK_KEY", "AlertStore", "Evaluation"]

#: pg_try_advisory_xact_lock key of an evaluation (claims use 7240513002, migrations 7240513001,
#: the event journal 7240513004)
LOCK_KEY = 7_240_513_003

_LOCK = "SELECT pg_try_advisory_xact_lock(%(key)s) AS locked"

_FIGURES = """
SELECT s.queued, s.processing, s.failed_last_hour, s.avg_wait_seconds, s.oldest_queued_age_seconds,
       c.alert_queue_depth, c.alert_failed_per_hour, c.alert_avg_wait_minutes,
       r.open_circuits, r.open_circuit_seconds
  FROM public.get_queue_stats() s
 CROSS JOIN public.job_queue_config c
 CROSS JOIN LATERAL (
       SELECT count(*) AS open_circuits,
              max(extract(epoch FROM now() - coalesce(x.circuit_since, now())))::float8 AS open_circuit_seconds
         FROM reactor.reactors x
        WHERE x.circuit_state <> 'closed'
          AND x.heartbeat_at >= now() - make_interval(secs => %(alive_s)s)) r
"""

_STATE = "SELECT name, firing, since FROM reactor.alerts"

_SEED = "INSERT INTO reactor.alerts (name) SELECT unnest(%(names)s::text[]) ON CONFLICT (name) DO NOTHING"

#: flip one alert, only if it still holds the old state; NOTIFY in the same transaction
_FLIP = """
WITH upd AS (
    UPDATE reactor.alerts
       SET firing = %(firing)s, since = now(), value = %(value)s, threshold = %(threshold)s,
           updated_at = now(), changed_by = %(reactor)s
     WHERE name = %(name)s AND firing IS DISTINCT FROM %(firing)s
    RETURNING name, firing, since, value, threshold)
SELECT upd.since,
       pg_notify('reactor_alerts', json_build_object(
           'alert', upd.name, 'status', CASE WHEN upd.firing THEN 'firing' ELSE 'resolved' END,
           'value', upd.value, 'threshold', upd.threshold, 'since', upd.since,
           'reactor', %(reactor)s::text, 'summary', %(summary)s::text)::text)
  FROM upd
"""

#: keep the figures of alerts that go on firing current (for whoever reads reactor.alerts)
_REFRESH = """
UPDATE reactor.alerts a
   SET value = u.value, threshold = u.threshold, updated_at = now()
  FROM jsonb_to_recordset(%(rows)s) AS u(name text, value float8, threshold float8)
 WHERE a.name = u.name AND a.firing
   AND (a.value IS DISTINCT FROM u.value OR a.threshold IS DISTINCT FROM u.threshold)
"""


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    with database_errors():
        try:
            yield
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaMissing(str(exc)) from exc


class Evaluation:
    """The statements of one evaluation, in its transaction (see :meth:`AlertStore.evaluation`)."""

    def __init__(self, cur: AsyncCursor[dict[str, Any]]) -> None:
        self._cur = cur

    async def figures(self, alive_s: float) -> dict[str, Any]:
        """``get_queue_stats()``, the thresholds of ``job_queue_config``, and the live reactors whose
        circuit is open (heartbeat within ``alive_s``)."""
        await self._cur.execute(_FIGURES, {"alive_s": alive_s})
        row = await self._cur.fetchone()
        assert row is not None
        return row

    async def state(self) -> dict[str, dict[str, Any]]:
        """Each alert's row: ``name``, ``firing``, ``since``."""
        await self._cur.execute(_STATE)
        return {r["name"]: r for r in await self._cur.fetchall()}

    async def seed(self, names: Sequence[str]) -> None:
        """Rows for alerts that have none yet (not firing)."""
        await self._cur.execute(_SEED, {"names": list(names)})

    async def flip(self, name: str, *, firing: bool, value: float, threshold: float, reactor: str,
                   summary: str) -> datetime | None:
        """Change an alert's state, and NOTIFY, if the row still holds the other state: the time of
        the change, or None if someone else changed it first."""
        await self._cur.execute(_FLIP, {
            "name": name, "firing": firing, "value": value, "threshold": threshold,
            "reactor": reactor, "summary": summary,
        })
        flipped = await self._cur.fetchone()
        return None if flipped is None else flipped["since"]

    async def refresh(self, rows: list[dict[str, Any]]) -> None:
        """The current ``value`` and ``threshold`` of alerts that go on firing."""
        await self._cur.execute(_REFRESH, {"rows": Jsonb(rows)})


class AlertStore:
    """Evaluations on ``pool`` (the reactor's own, reactor/db/store.py)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def evaluation(self) -> AsyncIterator[Evaluation | None]:
        """One evaluation's transaction; None when another reactor is evaluating now."""
        with _errors():
            async with self.pool.connection() as conn, conn.transaction(), \
                    conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(_LOCK, {"key": LOCK_KEY})
                lock = await cur.fetchone()
                yield Evaluation(cur) if lock and lock["locked"] else None
