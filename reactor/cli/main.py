"""The ``reactor`` command line."""

from __future__ import annotations

import argparse
import collections.abc
import logging
import sys
from collections.abc import Sequence

from reactor import __version__
from reactor.cli.settings import resolve_dsn
from reactor.core.errors import ReactorError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("reactor")


def _add_dsn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", help="PostgreSQL DSN (default: $DATABASE_URL)")


def _cmd_migrate(args: argparse.Namespace) -> int:
    from reactor.db.migrations import migrate_down, migrate_up

    if getattr(args, "supabase", False):
        return _cmd_migrate_supabase(args)
    dsn = resolve_dsn(args.dsn)
    if args.down:
        undone = migrate_down(dsn, to_version=args.to or 0)
        for m in undone:
            print(f"rolled back {m.version:04d}_{m.name}")  # noqa: T201
        if not undone:
            print("nothing to roll back")  # noqa: T201
        return 0
    applied = migrate_up(dsn)
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")  # noqa: T201
    if not applied:
        print("schema is up to date")  # noqa: T201
    return 0


def _dsn_or_embedded(dsn: str | None) -> str:
    """--dsn, else DATABASE_URL, else the embedded PostgreSQL (started and migrated if needed)."""
    import os

    if dsn or os.environ.get("DATABASE_URL"):
        return resolve_dsn(dsn)
    from reactor.db.embedded import EmbeddedPostgres, default_data_dir
    from reactor.db.migrations import migrate_up

    server = EmbeddedPostgres(default_data_dir())
    url = server.start()
    migrate_up(url)
    logger.info("no --dsn or DATABASE_URL: using the embedded PostgreSQL", extra={"dsn": url})
    return url


def _orchestrator_url(value: str | None) -> str:
    import os

    from reactor.core.errors import ConfigError

    url = value or os.environ.get("REACTOR_ORCHESTRATOR_URL", "")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            "no orchestrator given: pass --orchestrator-url http://HOST:PORT "
            "or set REACTOR_ORCHESTRATOR_URL"
        )
    return url


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dispatch")
    g.add_argument("--max-inflight", type=int, default=32,
                   help="renders this reactor runs at once at most (the fleet-wide limits still apply)")
    g.add_argument("--lease-seconds", type=float, default=15.0,
                   help="a job's lease; renewed every third of it while rendering")
    g.add_argument("--sweep-seconds", type=float, default=30.0,
                   help="how often the sweep takes back timed-out and crashed work")
    g.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long renders in flight may take before they are put back")
    g.add_argument("--reactor-id", help="this reactor's name in the database (default host-pid-random)")
    g.add_argument("--allow-pooler-port", action="store_true",
                   help="start even though the DSN looks like a transaction-mode pooler (port 6543, "
                        "pgbouncer=true), for a server that really listens there directly")
    g = p.add_argument_group("live feed and probes (tokens: $REACTOR_JWT_SECRET for HS256, --jwks for ES256/RS256)")
    g.add_argument("--listen", metavar="HOST:PORT",
                   help="serve the websocket feed (/feed), /livez, /readyz and /metrics on this address")
    g.add_argument("--jwks", metavar="PATH_OR_URL", help="JWKS with the ES256/RS256 keys that sign tokens")
    g.add_argument("--jwt-audience", metavar="AUD", help="the aud tokens must carry (e.g. authenticated)")
    g.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser Origin allowed to connect (repeatable; default: any)")
    g.add_argument("--max-clients", type=int, default=1000,
                   help="signed-in feed clients at most (more: HTTP 503, or 1013 after an auth message)")
    g.add_argument("--max-unauthenticated", type=int, default=None, metavar="N",
                   help="connections not signed in yet at most; one more pushes out the oldest "
                        "(default: max(100, max-clients / 2))")
    g.add_argument("--request-rate", type=float, default=20.0, metavar="PER_S",
                   help="messages a signed-in client may send a second, on average (beyond: closed, 1008)")
    g.add_argument("--request-burst", type=int, default=40, metavar="N",
                   help="messages a signed-in client may send at once")
    g.add_argument("--tls-cert", metavar="PEM", help="serve https/wss: certificate chain ($REACTOR_TLS_CERT)")
    g.add_argument("--tls-key", metavar="PEM", help="serve https/wss: private key ($REACTOR_TLS_KEY)")


def _parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or :PORT (every interface)."""
    from reactor.core.errors import ConfigError

    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen must be HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _feed_settings(args: argparse.Namespace) -> object:
    """The feed's settings from --listen and friends (None without --listen)."""
    import os

    from reactor.web.auth import AuthSettings
    from reactor.web.feed import FeedSettings

    listen = getattr(args, "listen", None)
    if not listen:
        return None
    host, port = _parse_listen(listen)
    auth = AuthSettings(
        jwt_secret=os.environ.get("REACTOR_JWT_SECRET") or None, jwks=args.jwks, audience=args.jwt_audience,
    )
    from reactor.web.feed import tls_context

    cert = args.tls_cert or os.environ.get("REACTOR_TLS_CERT") or None
    key = args.tls_key or os.environ.get("REACTOR_TLS_KEY") or None
    tls_context(cert, key)  # fail now, with a clear message, on a missing or unreadable file
    return FeedSettings(
        auth=auth, host=host, port=port, allowed_origins=tuple(args.allowed_origin),
        max_clients=args.max_clients, max_unauthenticated=args.max_unauthenticated,
        request_rate=args.request_rate, request_burst=args.request_burst, tls_cert=cert, tls_key=key,
    )


def _service_settings(args: argparse.Namespace, dsn: str, orchestrator: str) -> object:
    from reactor.engine.dispatcher import DispatchSettings
    from reactor.ops.alerts import settings_from
    from reactor.service import ServiceSettings, new_reactor_id
    from reactor.web.feed import FeedSettings

    feed = _feed_settings(args)
    assert feed is None or isinstance(feed, FeedSettings)
    return ServiceSettings(
        dsn=dsn,
        orchestrator_url=orchestrator,
        reactor_id=args.reactor_id or new_reactor_id(),
        sweep_every_s=args.sweep_seconds,
        dispatch=DispatchSettings(
            max_inflight=args.max_inflight,
            lease_s=args.lease_seconds,
            renew_every_s=args.lease_seconds / 3,
            drain_grace_s=args.drain_seconds,
        ),
        feed=feed,
        alerts=settings_from(getattr(args, "alert_webhook", None)),
    )


def _cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from reactor.service import Service, ServiceSettings

    orchestrator = _orchestrator_url(args.orchestrator_url)
    dsn = _dsn_or_embedded(args.dsn)
    if not args.allow_pooler_port:
        from reactor.core.errors import ConfigError
        from reactor.ops.checks import transaction_pooler_reason

        reason = transaction_pooler_reason(dsn)
        if reason is not None:
            raise ConfigError(f"not starting: {reason} (a server that really listens on 6543 "
                              "directly: pass --allow-pooler-port)")
    settings = _service_settings(args, dsn, orchestrator)
    assert isinstance(settings, ServiceSettings)
    service = Service(settings)
    anyio.run(service.run, backend="asyncio", backend_options=_loop_options())
    return 0


def _loop_options() -> dict[str, bool]:
    """uvloop when it is installed: it halves the reactor's CPU per job (bench/reactor_bench.py)."""
    import importlib.util

    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def _cmd_dev_orchestrator(args: argparse.Namespace) -> int:
    from reactor.testing import orchestrator as devorch

    return devorch.run_from_args(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from reactor.cli import demo

    return demo.run(args)


# -- runbook commands (logic in reactor/ops/runbook.py; printing here) ------------------------------------
#
# Exit codes: 0 done; 1 the command ran and the answer is no (a check failed, no such job, a job
# whose status does not allow the change); 2 it could not run (usage, no or bad DSN, database
# unreachable, schema missing, a malformed id, duration, JSON or setting).


def _print(text: str = "") -> None:
    print(text)  # noqa: T201


def _json_default(value: object) -> object:
    import dataclasses
    import datetime as dt
    import decimal
    import uuid

    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _print_json(value: object) -> None:
    import json

    _print(json.dumps(value, default=_json_default, indent=2))


def _fmt(value: object) -> str:
    """A value as an operator reads (and `config set` takes) it."""
    import datetime as dt
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(value, dt.time):
        return value.strftime("%H:%M")
    if isinstance(value, dt.timedelta):
        if value.seconds == 0 and value.microseconds == 0:
            return f"{value.days} days" if value.days != 1 else "1 day"
        return f"{value.total_seconds():g} seconds"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        _print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


_Command = collections.abc.Callable[[argparse.Namespace], int]


def _refusal_exits_1(command: _Command) -> _Command:
    """`ops.Refused` (the answer is no) exits 1; other ReactorErrors reach main() (exit 2)."""
    import functools

    @functools.wraps(command)
    def wrapper(args: argparse.Namespace) -> int:
        from reactor.ops.runbook import Refused

        try:
            return command(args)
        except Refused as exc:
            print(f"reactor: {exc}", file=sys.stderr)  # noqa: T201
            return 1

    return wrapper


def _cmd_status(args: argparse.Namespace) -> int:
    from reactor.ops.runbook import connect, status

    with connect(resolve_dsn(args.dsn)) as conn:
        st = status(conn, alive_within_s=args.alive_seconds)
    if args.json:
        _print_json(st)
        return 0
    s, lim, cfg = st.stats, st.limits, st.config
    _print(f"queue      {s['queued']} queued (high {s['queued_high']}, medium {s['queued_medium']}, "
           f"low {s['queued_low']}), {s['processing']} processing, {s['completed']} completed, "
           f"{s['failed']} failed, {s['cancelled']} cancelled")
    wait = "-" if s["avg_wait_seconds"] is None else f"{s['avg_wait_seconds']:.1f} s"
    run = "-" if s["avg_processing_seconds"] is None else f"{s['avg_processing_seconds']:.1f} s"
    _print(f"last hour  {s['completed_last_hour']} completed, {s['failed_last_hour']} failed; "
           f"average wait {wait}, average render {run}")
    old = st.oldest_queued
    if old is None:
        _print("oldest     nothing queued")
    else:
        waiting = "" if old["run_after"] <= old["created_at"] else f", retry due {_fmt(old['run_after'])}"
        _print(f"oldest     {old['id']} {old['job_type']} ({old['priority']}), queued {_ago(old['age_seconds'])} "
               f"ago{waiting}")
    peak = "none" if cfg.get("peak_hour_start") is None else (
        f"{_fmt(cfg['peak_hour_start'])}-{_fmt(cfg['peak_hour_end'])} {cfg['timezone']} "
        f"x{_fmt(cfg['peak_worker_multiplier'])}" + (" (now)" if lim["peak"] else ""))
    _print(f"limits     {lim['max_renders']} renders, {lim['max_manim']} manim in effect "
           f"(configured {cfg['max_concurrent_renders']}, {cfg['max_manim_renders']}); peak hours {peak}; "
           f"timeout {cfg['job_timeout_minutes']} min")
    if lim["paused"]:
        p = st.pause
        since = "" if p is None else f" since {_fmt(p['paused_at'])} by {p['paused_by']}"
        back = "" if p is None else f"; `reactor resume` restores {p['previous']}"
        _print(f"           PAUSED{since}: no new render starts{back}")
    _print(f"reactors   {len(st.reactors_alive)} alive (heartbeat within {st.alive_within_s:g} s)")
    for r in st.reactors_alive:
        _print(f"           {r['id']} on {r['hostname']} pid {r['pid']} v{r['version']}, "
               f"up since {_fmt(r['started_at'])}, beat {_ago(r['silent_seconds'])} ago")
        if r.get("circuit_state", "closed") != "closed":
            _print(f"           RENDER FARM UNREACHABLE for {r['id']}: circuit {r['circuit_state']} "
                   f"since {_fmt(r['circuit_since'])}; queued jobs wait, no retry is spent")
    for r in st.reactors_silent:
        _print(f"           silent: {r['id']} on {r['hostname']}, last beat {_ago(r['silent_seconds'])} ago")
    return 0


def _job_rows(jobs: Sequence[dict[str, object]]) -> list[list[str]]:
    rows = []
    for j in jobs:
        error = ""
        if j["error_category"]:
            error = f"{j['error_category']}: {j['error_message'] or ''}"
            error = error if len(error) <= 60 else error[:59] + "…"
        rows.append([
            str(j["id"]), str(j["job_type"]), str(j["priority"]), str(j["status"]),
            "" if j["queue_position"] is None else str(j["queue_position"]),
            f"{j['retry_count']}/{j['max_retries']}", _fmt(j["created_at"]), error,
        ])
    return rows


def _cmd_jobs(args: argparse.Namespace) -> int:
    from reactor.ops.runbook import connect, list_jobs, parse_uuid

    user = parse_uuid(args.user, "--user") if args.user else None
    with connect(resolve_dsn(args.dsn)) as conn:
        jobs = list_jobs(conn, status=args.status, job_type=args.type, user_id=user, limit=args.limit)
    if args.json:
        _print_json(jobs)
        return 0
    if not jobs:
        _print("no jobs")
        return 0
    _table(["ID", "TYPE", "PRIORITY", "STATUS", "POS", "RETRIES", "CREATED", "ERROR"], _job_rows(jobs))
    return 0


@_refusal_exits_1
def _cmd_show(args: argparse.Namespace) -> int:
    import json

    from reactor.ops.runbook import connect, parse_uuid, show_job

    job_id = parse_uuid(args.id)
    with connect(resolve_dsn(args.dsn)) as conn:
        detail = show_job(conn, job_id)
    if args.json:
        _print_json(detail)
        return 0
    for key, value in detail.job.items():
        if key in ("payload", "result", "error_details") and value is not None:
            text = json.dumps(value, indent=2, ensure_ascii=False, default=_json_default)
            _print(f"{key + ':':<18}{text.replace(chr(10), chr(10) + ' ' * 18)}")
        else:
            _print(f"{key + ':':<18}{_fmt(value)}")
    _print()
    _print(f"events ({len(detail.events)}):")
    _table(
        ["SEQ", "AT", "KIND", "STATUS", "RETRIES", "ERROR", "ACTOR"],
        [[str(e["seq"]), _fmt(e["at"]), str(e["kind"]),
          f"{e['old_status']} -> {e['status']}" if e["old_status"] else str(e["status"] or ""),
          "" if e["retry_count"] is None else str(e["retry_count"]), str(e["error_category"] or ""),
          str(e["actor"] or "")] for e in detail.events],
    )
    return 0


@_refusal_exits_1
def _cmd_retry(args: argparse.Namespace) -> int:
    from reactor.core.errors import ConfigError
    from reactor.ops.runbook import connect, parse_duration, parse_uuid, retry_failed_since, retry_job

    if (args.id is None) == (args.failed_since is None):
        raise ConfigError("give a job id, or --failed-since DURATION (e.g. 2h), not both")
    job_id = parse_uuid(args.id) if args.id else None
    since = parse_duration(args.failed_since) if args.failed_since else None
    with connect(resolve_dsn(args.dsn)) as conn:
        if job_id is not None:
            job = retry_job(conn, job_id)
            if args.json:
                _print_json(job)
            else:
                _print(f"queued {job['id']} again ({job['job_type']}, {job['priority']}), "
                       f"queue position {job['queue_position']}, retries 0/{job['max_retries']}")
            return 0
        assert since is not None
        jobs = retry_failed_since(conn, since)
    if args.json:
        _print_json(jobs)
        return 0
    if not jobs:
        _print(f"no job failed in the last {args.failed_since}")
        return 0
    _print(f"queued {len(jobs)} failed job{'s' if len(jobs) != 1 else ''} again:")
    _table(["ID", "TYPE", "PRIORITY", "FAILED", "WAS"],
           [[str(j["id"]), str(j["job_type"]), str(j["priority"]), _fmt(j["failed_at"]),
             f"{j['was_category'] or ''}: {j['was_message'] or ''}"[:70]] for j in jobs])
    return 0


@_refusal_exits_1
def _cmd_cancel(args: argparse.Namespace) -> int:
    from reactor.ops.runbook import cancel_job, connect, parse_uuid

    job_id = parse_uuid(args.id)
    with connect(resolve_dsn(args.dsn)) as conn:
        res = cancel_job(conn, job_id)
    if args.json:
        _print_json({"job": res.job, "was": res.was, "changed": res.changed, "held_by": res.held_by})
    elif not res.changed:
        _print(f"job {job_id} was cancelled already")
    elif res.was == "processing":
        _print(f"cancelled {job_id} (was processing on {res.held_by or 'no reactor'}: "
               "the reactor aborts the render when it sees the change)")
    else:
        _print(f"cancelled {job_id} (was queued: it will not start)")
    return 0


def _cmd_requeue_stuck(args: argparse.Namespace) -> int:
    from reactor.ops.runbook import connect, requeue_stuck

    with connect(resolve_dsn(args.dsn)) as conn:
        swept = requeue_stuck(conn, grace_s=args.grace_seconds, orphan_s=args.orphan_seconds)
    if args.json:
        _print_json(swept)
        return 0
    if not swept:
        _print("nothing stuck")
        return 0
    _print(f"took back {len(swept)} job{'s' if len(swept) != 1 else ''}:")
    _table(["ID", "NOW", "REASON", "HELD BY"],
           [[str(r["id"]), str(r["status"]), str(r["reason"]), str(r["held_by"] or "-")] for r in swept])
    return 0


def _cmd_pause(args: argparse.Namespace) -> int:
    from reactor.ops.runbook import connect, pause

    with connect(resolve_dsn(args.dsn)) as conn:
        res = pause(conn)
    if args.json:
        _print_json(res)
    elif res.changed:
        _print(f"paused: no new render starts (max_concurrent_renders 0, was {res.previous}); renders in "
               "flight finish. Undo with `reactor resume`.")
    else:
        since = f" since {_fmt(res.paused_at)} by {res.paused_by}" if res.paused_at else ""
        _print(f"paused already{since}" + (f"; `reactor resume` restores {res.previous}" if res.previous else ""))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from reactor.ops.runbook import connect, resume

    with connect(resolve_dsn(args.dsn)) as conn:
        res = resume(conn, to=args.to)
    if args.json:
        _print_json(res)
    elif not res.changed:
        _print(f"not paused: max_concurrent_renders is {res.max_concurrent_renders}")
    else:
        why = {"--to": "as asked", "remembered": "the value before the pause",
               "default": "the default: no earlier value was remembered"}[res.source]
        _print(f"resumed: max_concurrent_renders {res.max_concurrent_renders} ({why})")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from reactor.ops.runbook import config_show, connect

    with connect(resolve_dsn(args.dsn)) as conn:
        cfg = config_show(conn)
    if args.json:
        _print_json(cfg)
        return 0
    width = max(len(k) for k in cfg)
    for key, value in cfg.items():
        _print(f"{key:<{width}}  {_fmt(value)}")
    return 0


def _cmd_config_set(args: argparse.Namespace) -> int:
    from reactor.ops.runbook import config_set, connect, parse_assignments

    assignments = parse_assignments(args.assignments)
    with connect(resolve_dsn(args.dsn)) as conn:
        cfg = config_set(conn, assignments)
    if args.json:
        _print_json(cfg)
        return 0
    for key in assignments:
        _print(f"{key} = {_fmt(cfg[key])}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from reactor.ops.runbook import connect, parse_uuid, submit

    user = parse_uuid(args.user, "--user") if args.user else None
    with connect(resolve_dsn(args.dsn)) as conn:
        job = submit(conn, job_type=args.type, payload=args.payload, input_text=args.input,
                     priority=args.priority, user_id=user)
    if args.json:
        _print_json(job)
    else:
        _print(f"{job['id']} queue_position {job['queue_position']} ({job['job_type']}, {job['priority']}, "
               f"renderer {job['renderer']})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import os

    from reactor.ops.checks import check

    url = args.orchestrator_url or os.environ.get("REACTOR_ORCHESTRATOR_URL") or None
    results = check(resolve_dsn(args.dsn), orchestrator_url=url, listen_timeout_s=args.listen_timeout)
    ok = all(r.ok for r in results)
    if args.json:
        _print_json({"ok": ok, "checks": results})
    else:
        width = max(len("orchestrator"), *(len(r.name) for r in results))
        for r in results:
            mark = "ok" if r.ok else ("skip" if r.ok is None else "FAIL")
            _print(f"{mark:<5} {r.name:<{width}}  {r.detail}")
        if url is None:
            _print(f"{'-':<5} {'orchestrator':<{width}}  not checked: pass --orchestrator-url URL")
    return 0 if ok else 1


def _add_ops_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        _add_dsn(p)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    p = sub.add_parser("status", help="queue figures, limits in effect, reactors alive, oldest queued job")
    common(p)
    p.add_argument("--alive-seconds", type=float, default=90.0,
                   help="a reactor is alive if it beat within this many seconds (default 90: three sweeps)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("jobs", help="list jobs, newest first")
    common(p)
    p.add_argument("--status", choices=["queued", "processing", "completed", "failed", "cancelled"])
    p.add_argument("--type", help="job type, e.g. doubt")
    p.add_argument("--user", help="user_id (UUID)")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser("show", help="one job with its payload, result, error and events (exit 1: no such job)")
    common(p)
    p.add_argument("id", help="job id")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("retry", help="a failed or cancelled job back to queued, with its retries reset to 0")
    common(p)
    p.add_argument("id", nargs="?", help="job id")
    p.add_argument("--failed-since", metavar="DURATION",
                   help="every job that failed within DURATION (30m, 2h, 1h30m, 2d)")
    p.set_defaults(func=_cmd_retry)

    p = sub.add_parser("cancel", help="a queued or processing job to cancelled (exit 1: finished already)")
    common(p)
    p.add_argument("id", help="job id")
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser("requeue-stuck", help="what the sweep does, now: take back expired leases and timeouts")
    common(p)
    p.add_argument("--grace-seconds", type=float, default=30.0,
                   help="past job_timeout_minutes, wait this long before taking a job back (default 30)")
    p.add_argument("--orphan-seconds", type=float, default=30.0,
                   help="a job processing without a lease is taken back after this long (default 30)")
    p.set_defaults(func=_cmd_requeue_stuck)

    p = sub.add_parser("pause", help="emergency stop: no new render starts (max_concurrent_renders = 0)")
    common(p)
    p.set_defaults(func=_cmd_pause)

    p = sub.add_parser("resume", help="undo a pause: restore max_concurrent_renders as it was")
    common(p)
    p.add_argument("--to", type=int, help="resume with this limit instead of the one before the pause")
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("config", help="show or change job_queue_config")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    q = config_sub.add_parser("show", help="every setting")
    common(q)
    q.set_defaults(func=_cmd_config_show)
    q = config_sub.add_parser("set", help="KEY=VALUE ...: all or nothing, checked by the database")
    common(q)
    q.add_argument("assignments", nargs="+", metavar="KEY=VALUE",
                   help="e.g. max_concurrent_renders=8 peak_hour_start=18:00 (empty or null: NULL)")
    q.set_defaults(func=_cmd_config_set)

    p = sub.add_parser("submit", help="submit one job (prints its id and queue position)")
    common(p)
    p.add_argument("--type", required=True, help="job type, e.g. doubt")
    p.add_argument("--priority", choices=["high", "medium", "low"], help="default medium")
    p.add_argument("--user", help="user_id (UUID)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--payload", metavar="JSON", help='the whole payload, e.g. \'{"question": "Why?"}\'')
    given.add_argument("--input", metavar="TEXT", help="the job type's input field (doubt: question)")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("check", help="pre-flight: database, LISTEN/NOTIFY, not a transaction pooler, "
                                     "migrations, orchestrator (exit 1 if any fails)")
    common(p)
    p.add_argument("--orchestrator-url", help="check GET URL/health ($REACTOR_ORCHESTRATOR_URL)")
    p.add_argument("--listen-timeout", type=float, default=5.0,
                   help="how long to wait for the NOTIFY round trip (default 5 s)")
    p.set_defaults(func=_cmd_check)


def _cmd_migrate_supabase(args: argparse.Namespace) -> int:
    """`reactor migrate --supabase`: the numbered migrations, then the optional Supabase hardening;
    with --down, roll back the hardening alone."""
    from reactor.core.errors import ConfigError
    from reactor.db.migrations import migrate_optional_down, migrate_optional_up, migrate_up

    dsn = resolve_dsn(args.dsn)
    if args.to is not None:
        raise ConfigError("--to does not go with --supabase (the hardening is rolled back alone, or by --down)")
    if args.down:
        undone = migrate_optional_down(dsn, "supabase")
        _print("rolled back supabase (optional)" if undone else "supabase (optional) is not applied: nothing to do")
        return 0
    applied = migrate_up(dsn)
    for m in applied:
        _print(f"applied {m.version:04d}_{m.name}")
    if not applied:
        _print("schema is up to date")
    done = migrate_optional_up(dsn, "supabase")
    _print("applied supabase (optional)" if done else "supabase (optional) is applied already")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reactor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reactor {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply the schema migrations (or roll them back with --down)")
    _add_dsn(p)
    p.add_argument("--down", action="store_true", help="roll back: remove what the migrations created")
    p.add_argument("--to", type=int, help="with --down: stop at this version (default 0: all)")
    p.add_argument("--supabase", action="store_true",
                   help="also apply the optional Supabase hardening (row level security, rate limit); "
                        "with --down: roll back only that")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("run", help="run the reactor")
    _add_dsn(p)
    p.add_argument("--orchestrator-url", help="Video Orchestrator base URL ($REACTOR_ORCHESTRATOR_URL)")
    _add_run_options(p)
    p.add_argument("--journald", action="store_true", help="log to stdout with <N> priority prefixes")
    p.add_argument("--alert-webhook", metavar="URL",
                   help="POST alerts (firing and resolved) here as JSON with a Slack-compatible text "
                        "($REACTOR_ALERT_WEBHOOK)")
    p.set_defaults(func=_cmd_run)

    from reactor.testing import orchestrator as devorch

    p = sub.add_parser("dev-orchestrator", help="run the orchestrator test double (for demos and tests)")
    devorch.add_arguments(p)
    p.set_defaults(func=_cmd_dev_orchestrator)

    p = sub.add_parser("demo", help="everything on this machine: private PostgreSQL, orchestrator double, "
                                    "reactor and a stream of sample jobs")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    p.add_argument("--rate", type=float, default=2.0, help="sample jobs submitted per second")
    p.add_argument("--fresh", action="store_true", help="start from an empty database")
    p.add_argument("--port", type=int, default=8080, help="the dashboard and feed port on 127.0.0.1 (0: any)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("smoke", help="after a deploy: one job submitted as users do, followed to a reachable "
                                     "video (exit 1 naming the failed step)")
    _add_dsn(p)
    p.add_argument("--rest-url", help="submit through PostgREST at this base URL instead of SQL")
    p.add_argument("--rest-key", help="PostgREST key (apikey and Bearer) ($REACTOR_REST_KEY)")
    p.add_argument("--type", dest="job_type", default="topic_short", help="job type (default topic_short)")
    p.add_argument("--input", default="reactor smoke test", help="the text to render")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for completion (default 90)")
    p.add_argument("--max-retries", type=int, default=0,
                   help="retries the smoke job may spend (default 0: report the first failure)")
    p.set_defaults(func=_cmd_smoke)

    _add_ops_commands(sub)
    return parser


def _cmd_smoke(args: argparse.Namespace) -> int:
    import os

    from reactor.ops.smoke import SmokeFailed, SmokeSettings, run_smoke

    rest_key = args.rest_key or os.environ.get("REACTOR_REST_KEY")
    dsn = None if args.rest_url else resolve_dsn(args.dsn)
    settings = SmokeSettings(
        dsn=dsn, rest_url=args.rest_url, rest_key=rest_key, job_type=args.job_type, input_text=args.input,
        timeout_s=args.timeout, max_retries=args.max_retries,
        print_fn=lambda line: print(line, flush=True),  # noqa: T201
    )
    try:
        summary = run_smoke(settings)
    except SmokeFailed as exc:
        print(f"FAIL  {exc}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"smoke test passed in {summary['seconds']:.2f} s (job {summary['job_id']})")  # noqa: T201
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from reactor.core.logs import setup_logging

    setup_logging(str(args.log_level), journald=bool(getattr(args, "journald", False)))
    try:
        rc: int = args.func(args)
    except ReactorError as exc:
        print(f"reactor: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 130
    return rc
