"""``reactor check``: pre-flight checks before a reactor is started against a database.

In order: the DSN is not a transaction-mode pooler (LISTEN cannot work through one); the database
answers; LISTEN/NOTIFY works on a fresh connection; the migrations are current; and, when a URL is
given, the orchestrator's ``GET /health`` answers 2xx. ``reactor run`` also refuses a DSN that
:func:`transaction_pooler_reason` names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from reactor.core.errors import DatabaseError
from reactor.db.migrations import discover, discover_optional
from reactor.db.session import Row, conninfo_params, listen_round_trip, migration_state
from reactor.ops.runbook import connect

__all__ = ["TRANSACTION_POOLER_PORT", "CheckResult", "check", "transaction_pooler_reason"]

#: the port of Supabase's transaction-mode pooler (Supavisor)
TRANSACTION_POOLER_PORT = "6543"


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


def transaction_pooler_reason(dsn: str, pgport: str | None = None) -> str | None:
    """Why ``dsn`` goes through a transaction-mode pooler (so LISTEN cannot work), or None.
    ``pgport``: libpq's default port (``$PGPORT``), for a DSN that names none."""
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
    params = conninfo_params(rest)
    ports = str(params.get("port") or pgport or "").split(",")
    if TRANSACTION_POOLER_PORT in (p.strip() for p in ports):
        signs.append(f"port {TRANSACTION_POOLER_PORT}")
    if not signs:
        return None
    return f"this DSN goes through a transaction-mode pooler ({' and '.join(signs)}): {_USE_DIRECT}"


def _check_listen(dsn: str, timeout_s: float) -> CheckResult:
    try:
        arrived = listen_round_trip(dsn, timeout_s)
    except DatabaseError as exc:
        return CheckResult("listen", False, f"LISTEN/NOTIFY failed: {exc}")
    if arrived:
        return CheckResult("listen", True, "LISTEN/NOTIFY round trip on a fresh connection")
    return CheckResult(
        "listen", False,
        f"a NOTIFY did not arrive within {timeout_s:g} s: is this a transaction-mode pooler "
        f"(PgBouncer, Supabase port {TRANSACTION_POOLER_PORT})? {_USE_DIRECT}",
    )


def _check_migrations(dsn: str) -> CheckResult:
    try:
        done = migration_state(dsn)
    except DatabaseError as exc:
        return CheckResult("migrations", False, f"cannot read reactor.schema_migrations: {exc}")
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
    pgport: str | None = None,
) -> list[CheckResult]:
    """Pre-flight checks, in order: the DSN is not a transaction pooler; the database answers;
    LISTEN/NOTIFY works on a fresh connection; the migrations are current; and, when a URL is
    given, the orchestrator's ``GET /health`` answers 2xx. Database checks after a failed one are
    not run (``ok`` None)."""
    results: list[CheckResult] = []
    reason = transaction_pooler_reason(dsn, pgport)
    results.append(CheckResult("dsn", reason is None, reason or "not a transaction-mode pooler"))
    db_ok = reason is None
    if db_ok:
        try:
            with connect(dsn) as conn:
                server = conn.one("server") or {}
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
