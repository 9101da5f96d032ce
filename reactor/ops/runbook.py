"""The runbook operations behind ``reactor status``, ``jobs``, ``show``, ``retry``, ``cancel``,
``requeue-stuck``, ``prune``, ``pause``, ``resume``, ``config`` and ``submit`` (``check`` is
reactor/ops/checks.py).

Each function takes a session from :func:`connect` (reactor/db/session.py: a plain synchronous
connection) and returns data; the CLI prints it. Every change runs in one transaction that names
its author in ``job_events.actor`` (``cli:<os user>``). The queries are in ``sql/ops.sql``.

Two kinds of failure, told apart by the exit code of the CLI:

* :class:`~reactor.core.errors.ReactorError` (exit 2): the request could not be carried out: no or bad
  DSN, database unreachable, schema missing, a malformed id, duration, JSON or setting.
* :class:`Refused` (exit 1): the request was understood and the database answered, but the answer is
  no: the job does not exist, or its status does not allow the change (cancelling a completed job).
"""

from __future__ import annotations

import getpass
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from reactor.core.errors import ConfigError, DatabaseError, ReactorError, StatementRefused
from reactor.db.session import Row, Session

__all__ = [
    "CancelResult",
    "JobDetail",
    "JobNotFoundError",
    "JobStateError",
    "PauseResult",
    "PruneResult",
    "Refused",
    "ResumeResult",
    "Session",
    "Status",
    "cancel_job",
    "config_set",
    "config_show",
    "connect",
    "list_jobs",
    "parse_assignments",
    "parse_duration",
    "parse_uuid",
    "pause",
    "prune",
    "requeue_stuck",
    "resume",
    "retry_failed_since",
    "retry_job",
    "show_job",
    "status",
    "submit",
]

Conn = Session

#: ``max_concurrent_renders`` after ``resume`` when no earlier value is known (the column's default)
DEFAULT_MAX_RENDERS = 10
#: settings of job_queue_config that ``config set`` does not touch
_FIXED_COLUMNS = frozenset({"id", "updated_at"})
_SUPABASE_PREFIX = "supabase."


class Refused(ReactorError):
    """The command ran, and the answer is no (exit code 1)."""


class JobNotFoundError(Refused):
    """No job has this id."""


class JobStateError(Refused):
    """The job's status does not allow the change."""


# -- connections ---------------------------------------------------------------------------------


def default_actor() -> str:
    """Who the CLI says made a change (``job_events.actor``)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


def connect(dsn: str, *, connect_timeout: int = 10) -> Session:
    """A session for the runbook; ``DatabaseError`` when it cannot be opened."""
    return Session.connect(dsn, connect_timeout=connect_timeout)


# -- parsing -------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``30m``, ``2h``, ``1h30m``, ``90s``, ``2d``: a positive duration."""
    value = text.strip().lower()
    parts = _DURATION_PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ConfigError(f"a duration looks like 30m, 2h, 1h30m or 2d, got {text!r}")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"a duration must be more than 0, got {text!r}")
    return timedelta(seconds=seconds)


def parse_uuid(text: str, what: str = "a job id") -> UUID:
    try:
        return UUID(text.strip())
    except ValueError:
        raise ConfigError(f"{what} is a UUID such as 6f1c0c52-1b9e-4a7e-9d3c-2f0e5a1b7c44, got {text!r}") from None


def parse_assignments(items: Sequence[str]) -> dict[str, str | None]:
    """``KEY=VALUE`` pairs; an empty value or ``null`` means NULL. Refuses duplicates."""
    out: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"settings are given as KEY=VALUE, got {item!r}")
        if key in out:
            raise ConfigError(f"{key} is given twice")
        out[key] = None if value.strip().lower() in ("", "null") else value.strip()
    if not out:
        raise ConfigError("nothing to set: give one or more KEY=VALUE")
    return out


# -- status --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """What ``reactor status`` shows."""

    stats: Row
    limits: Row
    config: Row
    #: the value a pause replaced, when and by whom (None unless paused and remembered)
    pause: Row | None
    reactors_alive: list[Row]
    #: reactors registered but silent for longer than ``alive_within_s`` (crashed, or stopped hard)
    reactors_silent: list[Row]
    oldest_queued: Row | None
    alive_within_s: float


def status(conn: Conn, *, alive_within_s: float = 90.0) -> Status:
    """Queue figures, limits in effect, reactors alive (heartbeat within ``alive_within_s``), oldest job.

    A reactor beats at every sweep (30 s by default): 90 s is three sweeps.
    """
    with conn.reading():
        features = conn.one("features") or {}
        stats = conn.one("queue_stats") or {}
        limits = conn.one("effective_limits") or {}
        config = conn.one("config") or {}
        pause_row = conn.one("pause_state") if features.get("pause_memory") else None
        reactors = conn.all("reactors")
        oldest = conn.one("oldest_queued")
    alive = [r for r in reactors if r["silent_seconds"] <= alive_within_s]
    silent = [r for r in reactors if r["silent_seconds"] > alive_within_s]
    return Status(
        stats=stats, limits=limits, config=config,
        pause=pause_row if limits.get("paused") else None,
        reactors_alive=alive, reactors_silent=silent, oldest_queued=oldest, alive_within_s=alive_within_s,
    )


# -- jobs ----------------------------------------------------------------------------------------

JOB_STATUSES = ("queued", "processing", "completed", "failed", "cancelled")


def list_jobs(
    conn: Conn,
    *,
    status: str | None = None,
    job_type: str | None = None,
    user_id: UUID | None = None,
    limit: int = 20,
) -> list[Row]:
    """Jobs, newest first, with their queue position when queued."""
    if status is not None and status not in JOB_STATUSES:
        raise ConfigError(f"--status must be one of {', '.join(JOB_STATUSES)}, got {status!r}")
    if limit < 1:
        raise ConfigError(f"--limit must be 1 or more, got {limit}")
    return conn.all("list_jobs", {"status": status, "job_type": job_type, "user_id": user_id, "limit": limit})


@dataclass(frozen=True)
class JobDetail:
    job: Row
    events: list[Row]


def show_job(conn: Conn, job_id: UUID) -> JobDetail:
    """The job (payload, result, error fields) and its events in order; ``JobNotFoundError`` if none."""
    with conn.reading():
        job = conn.one("get_job", {"id": job_id})
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        events = conn.all("job_events", {"id": job_id})
    return JobDetail(job, events)


def _get(conn: Conn, job_id: UUID) -> Row:
    job = conn.one("get_job", {"id": job_id})
    assert job is not None  # read right after a change in the same transaction
    return job


def retry_job(conn: Conn, job_id: UUID, *, actor: str | None = None) -> Row:
    """A failed or cancelled job back to queued, now, with its whole retry allowance again.

    ``retry_count`` starts again at 0 (a retried job that fails on a flaky orchestrator gets its
    retries, instead of failing for good at the first error); the error fields, ``result`` and
    ``started_at`` are cleared; ``attempt`` keeps counting. The history stays in ``job_events``.
    """
    with conn.change(actor or default_actor()):
        row = conn.one("lock_job", {"id": job_id})
        if row is None:
            raise JobNotFoundError(f"no job {job_id}")
        if row["status"] not in ("failed", "cancelled"):
            raise JobStateError(
                f"job {job_id} is {row['status']}: only a failed or cancelled job can be retried"
            )
        conn.one("retry_job", {"id": job_id})
        return _get(conn, job_id)


def retry_failed_since(conn: Conn, since: timedelta, *, actor: str | None = None) -> list[Row]:
    """Every job that failed within ``since`` back to queued, as :func:`retry_job` does."""
    with conn.change(actor or default_actor()):
        return conn.all("retry_failed_since", {"since_s": since.total_seconds()})


@dataclass(frozen=True)
class CancelResult:
    job: Row
    #: the status before: queued or processing (changed now), or cancelled (nothing to do)
    was: str
    #: the reactor that was rendering it (its render is aborted when it sees the change)
    held_by: str | None = None

    @property
    def changed(self) -> bool:
        return self.was != "cancelled"


def cancel_job(conn: Conn, job_id: UUID, *, actor: str | None = None) -> CancelResult:
    """Queued or processing -> cancelled. Already cancelled: nothing to do. Finished: refused."""
    with conn.change(actor or default_actor()):
        row = conn.one("lock_job", {"id": job_id})
        if row is None:
            raise JobNotFoundError(f"no job {job_id}")
        was = str(row["status"])
        if was in ("completed", "failed"):
            raise JobStateError(
                f"job {job_id} is {was} already: only a queued or processing job can be cancelled"
                + (" (to run it again: reactor retry ID)" if was == "failed" else "")
            )
        if was != "cancelled":
            conn.one("cancel_job", {"id": job_id})
        return CancelResult(_get(conn, job_id), was, row["locked_by"] if was == "processing" else None)


def requeue_stuck(
    conn: Conn, *, grace_s: float = 30.0, orphan_s: float = 30.0, actor: str | None = None
) -> list[Row]:
    """What the sweep does, now: jobs whose lease expired, processing without a lease for longer
    than ``orphan_s``, or processing longer than ``job_timeout_minutes`` + ``grace_s`` go back to
    queued (retry_count + 1, TIMEOUT) or to failed once their retries are spent."""
    with conn.change(actor or default_actor()):
        return conn.all("sweep", {"grace_s": grace_s, "orphan_s": orphan_s})


@dataclass(frozen=True)
class PruneResult:
    #: what was (or, with dry_run, would be) deleted: retention, cutoff, jobs by status, events,
    #: oldest and newest completed_at (prune_preview in sql/ops.sql)
    preview: Row
    dry_run: bool
    jobs_pruned: int = 0
    events_pruned: int = 0
    batches: int = 0


def prune(conn: Conn, *, dry_run: bool = False, batch: int = 1000, actor: str | None = None) -> PruneResult:
    """What the sweep's retention does, now and to the end: finished jobs (completed, failed,
    cancelled) whose ``completed_at`` is older than ``job_queue_config.job_retention`` are deleted
    with their events, ``batch`` rows per transaction. ``dry_run`` only says what would go."""
    if batch < 1:
        raise ConfigError(f"--batch must be 1 or more, got {batch}")
    with conn.reading():
        preview = conn.one("prune_preview") or {}
    if dry_run:
        return PruneResult(preview, True)
    jobs = events = batches = 0
    since = None
    while True:
        with conn.change(actor or default_actor()):
            row = conn.one("prune_jobs", {"limit": batch, "since": since}) or {}
        batches += 1
        n = int(row.get("jobs_pruned") or 0)
        jobs += n
        events += int(row.get("events_pruned") or 0)
        since = row.get("last_completed_at") or since
        if n < batch:
            return PruneResult(preview, False, jobs, events, batches)


# -- pause and resume ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PauseResult:
    #: False when dispatch was paused already
    changed: bool
    #: the value the pause replaced (None when paused by hand before migration 0002 remembered it)
    previous: int | None
    paused_at: datetime | None
    paused_by: str | None


@dataclass(frozen=True)
class ResumeResult:
    #: False when dispatch was not paused
    changed: bool
    max_concurrent_renders: int
    #: where the value came from: "--to", "remembered", "default" (nothing remembered), "unchanged"
    source: str


def _require_pause_memory(conn: Conn) -> None:
    features = conn.one("features") or {}
    if not features.get("pause_memory"):
        raise DatabaseError("this database lacks migration 0002 (pause memory): run `reactor migrate`")


def pause(conn: Conn, *, actor: str | None = None) -> PauseResult:
    """Emergency stop: ``max_concurrent_renders = 0``. No new render starts; renders in flight
    finish. The value it replaces is remembered (migration 0002) for :func:`resume`."""
    with conn.change(actor or default_actor()):
        _require_pause_memory(conn)
        config = conn.one("config") or {}
        changed = config.get("max_concurrent_renders") != 0
        if changed:
            conn.one("set_max_renders", {"n": 0})
        state = conn.one("pause_state") or {}
    return PauseResult(changed, state.get("previous"), state.get("paused_at"), state.get("paused_by"))


def resume(conn: Conn, *, to: int | None = None, actor: str | None = None) -> ResumeResult:
    """Undo a pause: ``max_concurrent_renders`` back to ``to``, else the value the pause replaced,
    else the default (10). Not paused: nothing changes."""
    if to is not None and to < 1:
        raise ConfigError(f"--to must be 1 or more (0 is a pause), got {to}")
    with conn.change(actor or default_actor()):
        _require_pause_memory(conn)
        config = conn.one("config") or {}
        current = int(config.get("max_concurrent_renders", 0))
        if current != 0:
            return ResumeResult(False, current, "unchanged")
        state = conn.one("pause_state")
        if to is not None:
            value, source = to, "--to"
        elif state is not None:
            value, source = int(state["previous"]), "remembered"
        else:
            value, source = DEFAULT_MAX_RENDERS, "default"
        conn.one("set_max_renders", {"n": value})
    return ResumeResult(True, value, source)


# -- configuration -------------------------------------------------------------------------------


def config_show(conn: Conn) -> Row:
    """``job_queue_config``'s row; with the Supabase hardening, its settings under ``supabase.``."""
    with conn.reading():
        features = conn.one("features") or {}
        out = dict(conn.one("config") or {})
        out.pop("id", None)
        if features.get("supabase"):
            for key, value in (conn.one("supabase_settings") or {}).items():
                out[_SUPABASE_PREFIX + key] = value
    return out


def _settable(conn: Conn, table: str, prefix: str = "") -> dict[str, str]:
    """Setting name -> SQL type, for the columns of ``table`` that ``config set`` may change."""
    return {
        prefix + r["name"]: r["type"]
        for r in conn.all("columns", {"table": table})
        if r["name"] not in _FIXED_COLUMNS
    }


def config_set(conn: Conn, assignments: Mapping[str, str | None], *, actor: str | None = None) -> Row:
    """Change settings, all in one transaction: an unknown key or a bad value changes nothing.

    Values are text cast to each column's type by PostgreSQL; the table's triggers then check
    them and name the column in their errors. Returns the configuration after the change.
    """
    with conn.change(actor or default_actor()):
        features = conn.one("features") or {}
        known = _settable(conn, "public.job_queue_config")
        if features.get("supabase"):
            known |= _settable(conn, "reactor.supabase_settings", _SUPABASE_PREFIX)
        unknown = sorted(set(assignments) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown setting {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        for key, value in assignments.items():  # a value of the wrong type is named with its key
            try:
                conn.cast(value, known[key])
            except StatementRefused as exc:
                raise ConfigError(f"{key}: {exc}") from exc
        plain = {k: v for k, v in assignments.items() if not k.startswith(_SUPABASE_PREFIX)}
        supabase = {k.removeprefix(_SUPABASE_PREFIX): v for k, v in assignments.items()
                    if k.startswith(_SUPABASE_PREFIX)}
        for table, prefix, mine in (("public.job_queue_config", "", plain),
                                    ("reactor.supabase_settings", _SUPABASE_PREFIX, supabase)):
            if not mine:
                continue
            try:
                conn.update(table, mine, {k: known[prefix + k] for k in mine})
            except StatementRefused as exc:  # the triggers' and constraints' own words
                raise ConfigError(str(exc)) from exc
    return config_show(conn)


# -- submit --------------------------------------------------------------------------------------


def submit(
    conn: Conn,
    *,
    job_type: str,
    payload: str | None = None,
    input_text: str | None = None,
    priority: str | None = None,
    user_id: UUID | None = None,
    actor: str | None = None,
) -> Row:
    """Insert one job, as ``INSERT INTO jobs`` would. ``payload`` is a JSON object (text);
    ``input_text`` instead fills the job type's input field (``doubt`` -> ``question``)."""
    if (payload is None) == (input_text is None):
        raise ConfigError("give the job's input with either --payload JSON or --input TEXT")
    if payload is not None:
        try:
            parsed = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--payload is not JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ConfigError(f"--payload must be a JSON object, got {type(parsed).__name__}")
    with conn.change(actor or default_actor()):
        row = conn.one("submit", {
            "job_type": job_type, "priority": priority, "user_id": user_id,
            "payload": payload, "input": input_text,
        })
    assert row is not None
    return row


# -- schedules ------------------------------------------------------------------------------------


class ScheduleNotFoundError(Refused):
    """No schedule has this name."""


def list_schedules(conn: Conn) -> list[Row]:
    """Every schedule, the next to run first (disabled ones last)."""
    return conn.all("list_schedules")


def set_schedule_enabled(conn: Conn, name: str, enabled: bool, *, actor: str | None = None) -> Row:
    """Enable (the next slot from now on: missed slots are not caught up) or disable a schedule."""
    with conn.change(actor or default_actor()):
        row = conn.one("set_schedule_enabled", {"name": name, "enabled": enabled})
    if row is None:
        raise ScheduleNotFoundError(f"no schedule {name!r}")
    return row


def run_schedule_now(conn: Conn, name: str, *, actor: str | None = None) -> Row:
    """One job of the schedule now, outside its slots (its next slot stays as it is)."""
    with conn.change(actor or default_actor()):
        made = conn.one("run_schedule_now", {"name": name})
        if made is None or made["id"] is None:
            raise ScheduleNotFoundError(f"no schedule {name!r}")
        return _get(conn, made["id"])
