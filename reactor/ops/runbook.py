"""The runbook operations behind ``reactor status``, ``jobs``, ``show``, ``retry``, ``cancel``,
``requeue-stuck``, ``pause``, ``resume``, ``config``, ``submit`` and ``check``.

Plain synchronous psycopg: each function takes a connection from :func:`connect` (or a DSN) and
returns data; the CLI prints it. Every change runs in one transaction that names its author in
``job_events.actor`` (``cli:<os user>``). The queries are in ``sql/ops.sql``.

Two kinds of failure, told apart by the exit code of the CLI:

* :class:`~reactor.core.errors.ReactorError` (exit 2): the request could not be carried out: no or bad
  DSN, database unreachable, schema missing, a malformed id, duration, JSON or setting.
* :class:`Refused` (exit 1): the request was understood and the database answered, but the answer is
  no: the job does not exist, or its status does not allow the change (cancelling a completed job).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from reactor.core.errors import ConfigError, DatabaseError, ReactorError
from reactor.core.logs import redact
from reactor.db.sqlfiles import load_queries

__all__ = [
    "CancelResult",
    "CheckResult",
    "JobDetail",
    "JobNotFoundError",
    "JobStateError",
    "PauseResult",
    "Refused",
    "ResumeResult",
    "Status",
    "cancel_job",
    "check",
    "config_set",
    "config_show",
    "connect",
    "list_jobs",
    "parse_assignments",
    "parse_duration",
    "parse_uuid",
    "pause",
    "requeue_stuck",
    "resume",
    "retry_failed_since",
    "retry_job",
    "show_job",
    "status",
    "submit",
    "transaction_pooler_reason",
]

Row = dict[str, Any]
Conn = psycopg.Connection[Row]

#: ``max_concurrent_renders`` after ``resume`` when no earlier value is known (the column's default)
DEFAULT_MAX_RENDERS = 10
#: settings of job_queue_config that ``config set`` does not touch
_FIXED_COLUMNS = frozenset({"id", "updated_at"})
_SUPABASE_PREFIX = "supabase."
#: the port of Supabase's transaction-mode pooler (Supavisor)
TRANSACTION_POOLER_PORT = "6543"


class Refused(ReactorError):
    """The command ran, and the answer is no (exit code 1)."""


class JobNotFoundError(Refused):
    """No job has this id."""


class JobStateError(Refused):
    """The job's status does not allow the change."""


def _q() -> dict[str, str]:
    return load_queries("ops.sql")


# -- connections and errors --------------------------------------------------------------------


def default_actor() -> str:
    """Who the CLI says made a change (``job_events.actor``)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


def connect(dsn: str, *, connect_timeout: int = 10) -> Conn:
    """An autocommit connection with dict rows; ``DatabaseError`` when it cannot be made."""
    try:
        conn: Conn = psycopg.connect(
            dsn, autocommit=True, row_factory=dict_row, connect_timeout=connect_timeout,
            application_name="reactor cli",
        )
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to the database: {redact(_message(exc))}") from exc
    return conn


def _message(exc: BaseException) -> str:
    """The server's own words (and hint) for a psycopg error, else the error's text."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        return " ".join(str(exc).split())
    hint = getattr(diag, "message_hint", None)
    return f"{primary} ({hint})" if hint else str(primary)


@contextlib.contextmanager
def _database_errors() -> Iterator[None]:
    """psycopg errors out of the block become ``DatabaseError`` (a missing schema says what to do)."""
    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction,
            psycopg.errors.InvalidSchemaName) as exc:
        what = exc.diag.message_primary or str(exc).strip()
        raise DatabaseError(
            f"{what}: the reactor's schema is missing or older than this reactor; run `reactor migrate`"
        ) from exc
    except psycopg.Error as exc:
        raise DatabaseError(_message(exc)) from exc


@contextlib.contextmanager
def _change(conn: Conn, actor: str | None) -> Iterator[None]:
    """One transaction that records its author, with database errors translated."""
    with _database_errors(), conn.transaction():
        conn.execute(_q()["set_actor"], {"actor": actor or default_actor()})
        yield


def _one(conn: Conn, name: str, params: Mapping[str, Any] | None = None) -> Row | None:
    return conn.execute(_q()[name], params or {}).fetchone()


def _all(conn: Conn, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
    return conn.execute(_q()[name], params or {}).fetchall()


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
    with _database_errors(), conn.transaction():
        features = _one(conn, "features") or {}
        stats = _one(conn, "queue_stats") or {}
        limits = _one(conn, "effective_limits") or {}
        config = _one(conn, "config") or {}
        pause_row = _one(conn, "pause_state") if features.get("pause_memory") else None
        reactors = _all(conn, "reactors")
        oldest = _one(conn, "oldest_queued")
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
    with _database_errors():
        return _all(conn, "list_jobs", {"status": status, "job_type": job_type, "user_id": user_id, "limit": limit})


@dataclass(frozen=True)
class JobDetail:
    job: Row
    events: list[Row]


def show_job(conn: Conn, job_id: UUID) -> JobDetail:
    """The job (payload, result, error fields) and its events in order; ``JobNotFoundError`` if none."""
    with _database_errors(), conn.transaction():
        job = _one(conn, "get_job", {"id": job_id})
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        events = _all(conn, "job_events", {"id": job_id})
    return JobDetail(job, events)


def _get(conn: Conn, job_id: UUID) -> Row:
    job = _one(conn, "get_job", {"id": job_id})
    assert job is not None  # read right after a change in the same transaction
    return job


def retry_job(conn: Conn, job_id: UUID, *, actor: str | None = None) -> Row:
    """A failed or cancelled job back to queued, now, with its whole retry allowance again.

    ``retry_count`` starts again at 0 (a retried job that fails on a flaky orchestrator gets its
    retries, instead of failing for good at the first error); the error fields, ``result`` and
    ``started_at`` are cleared; ``attempt`` keeps counting. The history stays in ``job_events``.
    """
    with _change(conn, actor):
        row = _one(conn, "lock_job", {"id": job_id})
        if row is None:
            raise JobNotFoundError(f"no job {job_id}")
        if row["status"] not in ("failed", "cancelled"):
            raise JobStateError(
                f"job {job_id} is {row['status']}: only a failed or cancelled job can be retried"
            )
        _one(conn, "retry_job", {"id": job_id})
        return _get(conn, job_id)


def retry_failed_since(conn: Conn, since: timedelta, *, actor: str | None = None) -> list[Row]:
    """Every job that failed within ``since`` back to queued, as :func:`retry_job` does."""
    with _change(conn, actor):
        return _all(conn, "retry_failed_since", {"since_s": since.total_seconds()})


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
    with _change(conn, actor):
        row = _one(conn, "lock_job", {"id": job_id})
        if row is None:
            raise JobNotFoundError(f"no job {job_id}")
        was = str(row["status"])
        if was in ("completed", "failed"):
            raise JobStateError(
                f"job {job_id} is {was} already: only a queued or processing job can be cancelled"
                + (" (to run it again: reactor retry ID)" if was == "failed" else "")
            )
        if was != "cancelled":
            _one(conn, "cancel_job", {"id": job_id})
        return CancelResult(_get(conn, job_id), was, row["locked_by"] if was == "processing" else None)


def requeue_stuck(
    conn: Conn, *, grace_s: float = 30.0, orphan_s: float = 30.0, actor: str | None = None
) -> list[Row]:
    """What the sweep does, now: jobs whose lease expired, processing without a lease for longer
    than ``orphan_s``, or processing longer than ``job_timeout_minutes`` + ``grace_s`` go back to
    queued (retry_count + 1, TIMEOUT) or to failed once their retries are spent."""
    with _change(conn, actor):
        return _all(conn, "sweep", {"grace_s": grace_s, "orphan_s": orphan_s})


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
    features = _one(conn, "features") or {}
    if not features.get("pause_memory"):
        raise DatabaseError("this database lacks migration 0002 (pause memory): run `reactor migrate`")


def pause(conn: Conn, *, actor: str | None = None) -> PauseResult:
    """Emergency stop: ``max_concurrent_renders = 0``. No new render starts; renders in flight
    finish. The value it replaces is remembered (migration 0002) for :func:`resume`."""
    with _change(conn, actor):
        _require_pause_memory(conn)
        config = _one(conn, "config") or {}
        changed = config.get("max_concurrent_renders") != 0
        if changed:
            _one(conn, "set_max_renders", {"n": 0})
        state = _one(conn, "pause_state") or {}
    return PauseResult(changed, state.get("previous"), state.get("paused_at"), state.get("paused_by"))


def resume(conn: Conn, *, to: int | None = None, actor: str | None = None) -> ResumeResult:
    """Undo a pause: ``max_concurrent_renders`` back to ``to``, else the value the pause replaced,
    else the default (10). Not paused: nothing changes."""
    if to is not None and to < 1:
        raise ConfigError(f"--to must be 1 or more (0 is a pause), got {to}")
    with _change(conn, actor):
        _require_pause_memory(conn)
        config = _one(conn, "config") or {}
        current = int(config.get("max_concurrent_renders", 0))
        if current != 0:
            return ResumeResult(False, current, "unchanged")
        state = _one(conn, "pause_state")
        if to is not None:
            value, source = to, "--to"
        elif state is not None:
            value, source = int(state["previous"]), "remembered"
        else:
            value, source = DEFAULT_MAX_RENDERS, "default"
        _one(conn, "set_max_renders", {"n": value})
    return ResumeResult(True, value, source)


# -- configuration -------------------------------------------------------------------------------


def config_show(conn: Conn) -> Row:
    """``job_queue_config``'s row; with the Supabase hardening, its settings under ``supabase.``."""
    with _database_errors(), conn.transaction():
        features = _one(conn, "features") or {}
        out = dict(_one(conn, "config") or {})
        out.pop("id", None)
        if features.get("supabase"):
            for key, value in (_one(conn, "supabase_settings") or {}).items():
                out[_SUPABASE_PREFIX + key] = value
    return out


def _settable(conn: Conn, table: str, prefix: str = "") -> dict[str, str]:
    """Setting name -> SQL type, for the columns of ``table`` that ``config set`` may change."""
    return {
        prefix + r["name"]: r["type"]
        for r in _all(conn, "columns", {"table": table})
        if r["name"] not in _FIXED_COLUMNS
    }


def config_set(conn: Conn, assignments: Mapping[str, str | None], *, actor: str | None = None) -> Row:
    """Change settings, all in one transaction: an unknown key or a bad value changes nothing.

    Values are text cast to each column's type by PostgreSQL; the table's triggers then check
    them and name the column in their errors. Returns the configuration after the change.
    """
    with _change(conn, actor):
        features = _one(conn, "features") or {}
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
                conn.execute(sql.SQL("SELECT CAST(%s::text AS {})").format(sql.SQL(known[key])), (value,))
            except psycopg.Error as exc:
                raise ConfigError(f"{key}: {_message(exc)}") from exc
        plain = {k: v for k, v in assignments.items() if not k.startswith(_SUPABASE_PREFIX)}
        supabase = {k.removeprefix(_SUPABASE_PREFIX): v for k, v in assignments.items()
                    if k.startswith(_SUPABASE_PREFIX)}
        for table, prefix, mine in (("public.job_queue_config", "", plain),
                                    ("reactor.supabase_settings", _SUPABASE_PREFIX, supabase)):
            if not mine:
                continue
            statement = sql.SQL("UPDATE {} SET {}").format(
                sql.SQL(table),
                sql.SQL(", ").join(
                    sql.SQL("{} = CAST(%s::text AS {})").format(sql.Identifier(k), sql.SQL(known[prefix + k]))
                    for k in mine
                ),
            )
            try:
                conn.execute(statement, list(mine.values()))
            except psycopg.Error as exc:  # the triggers' and constraints' own words
                raise ConfigError(_message(exc)) from exc
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
    with _change(conn, actor):
        row = _one(conn, "submit", {
            "job_type": job_type, "priority": priority, "user_id": user_id,
            "payload": payload, "input": input_text,
        })
    assert row is not None
    return row


# -- pre-flight check ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    name: str
    #: True: passed; False: failed; None: not run (an earlier check failed)
    ok: bool | None
    detail: str
    extra: Row = field(default_factory=dict)


_PGBOUNCER_KV = re.compile(r"(?i)(?:^|\s)pgbouncer\s*=\s*'?([^\s']*)'?")

_USE_DIRECT = (
    "LISTEN/NOTIFY does not work there, so reactors would never hear "
    "of new jobs, cancellations or config changes; use the direct connection or a session-mode "
    "pooler on port 5432 (Supabase: Connect -> Direct connection, or Session pooler)"
)


def transaction_pooler_reason(dsn: str, env: Mapping[str, str] | None = None) -> str | None:
    """Why ``dsn`` goes through a transaction-mode pooler (so LISTEN cannot work), or None."""
    signs: list[str] = []
    # pgbouncer=true (Prisma's flag for a transaction pooler) is not a libpq parameter: take it out
    # before libpq reads the rest
    if "://" in dsn:
        parts = urlsplit(dsn)
        query = parse_qsl(parts.query, keep_blank_values=True)
        flags = [v for k, v in query if k.lower() == "pgbouncer"]
        rest = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k.lower() != "pgbouncer"])))
    else:
        flags = _PGBOUNCER_KV.findall(dsn)
        rest = _PGBOUNCER_KV.sub(" ", dsn)
    if any(f.lower() in ("true", "1", "yes", "on") for f in flags):
        signs.append("pgbouncer=true")
    try:
        params = conninfo_to_dict(rest)
    except psycopg.Error:
        params = {}
    environ = os.environ if env is None else env
    ports = str(params.get("port") or environ.get("PGPORT") or "").split(",")
    if TRANSACTION_POOLER_PORT in (p.strip() for p in ports):
        signs.append(f"port {TRANSACTION_POOLER_PORT}")
    if not signs:
        return None
    return f"this DSN goes through a transaction-mode pooler ({' and '.join(signs)}): {_USE_DIRECT}"


def _check_listen(dsn: str, timeout_s: float) -> CheckResult:
    channel = f"reactor_check_{secrets.token_hex(6)}"
    token = secrets.token_hex(8)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as listener, \
                psycopg.connect(dsn, autocommit=True, connect_timeout=10) as sender:
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            sender.execute("SELECT pg_notify(%s, %s)", (channel, token))
            for note in listener.notifies(timeout=timeout_s, stop_after=1):
                if note.channel == channel and note.payload == token:
                    return CheckResult("listen", True, "LISTEN/NOTIFY round trip on a fresh connection")
    except psycopg.Error as exc:
        return CheckResult("listen", False, f"LISTEN/NOTIFY failed: {_message(exc)}")
    return CheckResult(
        "listen", False,
        f"a NOTIFY did not arrive within {timeout_s:g} s: is this a transaction-mode pooler "
        f"(PgBouncer, Supabase port {TRANSACTION_POOLER_PORT})? {_USE_DIRECT}",
    )


def _check_migrations(dsn: str) -> CheckResult:
    from reactor.db.migrations import applied_versions, discover, discover_optional

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            done = applied_versions(conn)
    except psycopg.Error as exc:
        return CheckResult("migrations", False, f"cannot read reactor.schema_migrations: {_message(exc)}")
    shipped = discover()
    known = {m.version: m for m in shipped}
    optional = {m.version: m for m in discover_optional().values()}
    if not done:
        return CheckResult("migrations", False, "the reactor's schema is not there: run `reactor migrate`")
    unknown = sorted(v for v in done if v not in known and v not in optional)
    if unknown:
        return CheckResult(
            "migrations", False,
            f"the database has migration {unknown[-1]}, newer than this reactor knows: upgrade the reactor",
        )
    edited = []
    for version, checksum in done.items():
        m = known.get(version) or optional[version]
        if checksum is not None and checksum != m.checksum:
            edited.append(m.up.name)
    if edited:
        return CheckResult("migrations", False, f"applied migrations differ from these files: {', '.join(edited)}")
    missing = [f"{m.version:04d}_{m.name}" for m in shipped if m.version not in done]
    if missing:
        return CheckResult("migrations", False, f"not applied: {', '.join(missing)}: run `reactor migrate`")
    extras = [f"+ {m.name}" for v, m in sorted(optional.items()) if v in done]
    return CheckResult(
        "migrations", True,
        " ".join([f"current (version {max(known)})", *extras]),
        {"applied": sorted(done)},
    )


def _check_orchestrator(url: str, timeout_s: float) -> CheckResult:
    if not url.startswith(("http://", "https://")):
        return CheckResult("orchestrator", False, f"not an http(s) URL: {url!r}")
    health = url.rstrip("/") + "/health"
    try:
        response = httpx.get(health, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return CheckResult(
            "orchestrator", False,
            f"GET {health} failed: {type(exc).__name__}: {exc or 'no answer'} (is the orchestrator running "
            "and reachable from this host?)",
        )
    if not response.is_success:
        return CheckResult("orchestrator", False, f"GET {health} answered {response.status_code}, not 2xx")
    return CheckResult("orchestrator", True, f"GET {health} answered {response.status_code}")


def check(
    dsn: str,
    *,
    orchestrator_url: str | None = None,
    listen_timeout_s: float = 5.0,
    http_timeout_s: float = 5.0,
) -> list[CheckResult]:
    """Pre-flight checks, in order: the DSN is not a transaction pooler; the database answers;
    LISTEN/NOTIFY works on a fresh connection; the migrations are current; and, when a URL is
    given, the orchestrator's ``GET /health`` answers 2xx. Database checks after a failed one are
    not run (``ok`` None)."""
    results: list[CheckResult] = []
    reason = transaction_pooler_reason(dsn)
    results.append(CheckResult("dsn", reason is None, reason or "not a transaction-mode pooler"))
    db_ok = reason is None
    if db_ok:
        try:
            with connect(dsn) as conn:
                server = _one(conn, "server") or {}
            results.append(CheckResult(
                "database", True,
                f"PostgreSQL {server.get('version')}, database {server.get('database')} as {server.get('user')}",
                server,
            ))
        except DatabaseError as exc:
            results.append(CheckResult("database", False, str(exc)))
            db_ok = False
    else:
        results.append(CheckResult("database", None, "not tried: fix the DSN first"))
    if db_ok:
        listen = _check_listen(dsn, listen_timeout_s)
        results.append(listen)
        results.append(_check_migrations(dsn))
    else:
        results.append(CheckResult("listen", None, "not tried: no database"))
        results.append(CheckResult("migrations", None, "not tried: no database"))
    if orchestrator_url:
        results.append(_check_orchestrator(orchestrator_url, http_timeout_s))
    return results
