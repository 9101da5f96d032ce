"""The dashboard's actions: the runbook's own operations, run for an admin of the live feed.

The service hands :class:`RunbookActions` to the dashboard (reactor/web/dashboard.py), which runs
each action in a worker thread: a connection of its own with a lock and a statement timeout, one
transaction that records ``admin:<sub>`` in ``job_events.actor``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from reactor.core.errors import DatabaseError, ReactorError
from reactor.db.session import Session
from reactor.ops import runbook

__all__ = ["RunbookActions"]

logger = logging.getLogger(__name__)


class RunbookActions:
    """``cancel``, ``retry``, ``pause``, ``resume`` and ``set_limits`` on the database at ``dsn``."""

    def __init__(self, dsn: str, *, timeout_s: float = 10.0) -> None:
        self.dsn = dsn
        self.timeout_s = timeout_s

    def run(self, action: str, job_id: UUID | None, values: Mapping[str, str], actor: str) -> dict[str, Any]:
        """One runbook operation (blocking, as the CLI runs it): the reply's body."""
        ms = int(self.timeout_s * 1000)
        try:
            conn = Session.connect(self.dsn, connect_timeout=max(1, int(self.timeout_s)),
                                   application_name="reactor dashboard",
                                   options=f"-c lock_timeout={ms // 2} -c statement_timeout={ms}")
        except DatabaseError as exc:
            logger.warning("dashboard action: %s", " ".join(str(exc).split())[:200])
            return {"error": "database unavailable"}
        try:
            with conn:
                if action == "cancel":
                    assert job_id is not None
                    cancelled = runbook.cancel_job(conn, job_id, actor=actor)
                    return {"job": _brief(cancelled.job), "changed": cancelled.changed}
                if action == "retry":
                    assert job_id is not None
                    return {"job": _brief(runbook.retry_job(conn, job_id, actor=actor)), "changed": True}
                if action == "pause":
                    paused = runbook.pause(conn, actor=actor)
                    return {"changed": paused.changed}
                if action == "resume":
                    resumed = runbook.resume(conn, actor=actor)
                    return {"changed": resumed.changed, "max_concurrent_renders": resumed.max_concurrent_renders}
                config = runbook.config_set(conn, values, actor=actor)
                return {"changed": True, "config": config}
        except ReactorError as exc:  # refused (unknown job, wrong status) or a bad value: the reason
            return {"error": str(exc)}


def _brief(job: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": job["id"], "status": job["status"]}
