"""The runbook commands: ``status``, ``jobs``, ``show``, ``retry``, ``cancel``, ``requeue-stuck``,
``prune``, ``pause``, ``resume``, ``config``, ``submit``, ``schedules``, ``check``. The logic is
reactor/ops/runbook.py and reactor/ops/checks.py; printing is here.

Exit codes: 0 done; 1 the command ran and the answer is no (a check failed, no such job, a job
whose status does not allow the change); 2 it could not run (usage, no or bad DSN, database
unreachable, schema missing, a malformed id, duration, JSON or setting).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

from reactor.cli.output import ago, fmt, json_default, print_json, say, table
from reactor.cli.settings import add_dsn, resolve_dsn
from reactor.core.environment import Environment

__all__ = ["add_ops_commands"]


_Command = Callable[[argparse.Namespace, Environment], int]


def _refusal_exits_1(command: _Command) -> _Command:
    """`ops.Refused` (the answer is no) exits 1; other ReactorErrors reach main() (exit 2)."""
    @functools.wraps(command)
    def wrapper(args: argparse.Namespace, env: Environment) -> int:
        from reactor.ops.runbook import Refused

        try:
            return command(args, env)
        except Refused as exc:
            print(f"reactor: {exc}", file=sys.stderr)  # noqa: T201
            return 1

    return wrapper


def _cmd_status(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, status

    with connect(resolve_dsn(args.dsn, env)) as conn:
        st = status(conn, alive_within_s=args.alive_seconds)
    if args.json:
        print_json(st)
        return 0
    s, lim, cfg = st.stats, st.limits, st.config
    say(f"queue      {s['queued']} queued (high {s['queued_high']}, medium {s['queued_medium']}, "
           f"low {s['queued_low']}), {s['processing']} processing, {s['completed']} completed, "
           f"{s['failed']} failed, {s['cancelled']} cancelled")
    wait = "-" if s["avg_wait_seconds"] is None else f"{s['avg_wait_seconds']:.1f} s"
    run = "-" if s["avg_processing_seconds"] is None else f"{s['avg_processing_seconds']:.1f} s"
    say(f"last hour  {s['completed_last_hour']} completed, {s['failed_last_hour']} failed; "
           f"average wait {wait}, average render {run}")
    old = st.oldest_queued
    if old is None:
        say("oldest     nothing queued")
    else:
        waiting = "" if old["run_after"] <= old["created_at"] else f", retry due {fmt(old['run_after'])}"
        say(f"oldest     {old['id']} {old['job_type']} ({old['priority']}), queued {ago(old['age_seconds'])} "
               f"ago{waiting}")
    peak = "none" if cfg.get("peak_hour_start") is None else (
        f"{fmt(cfg['peak_hour_start'])}-{fmt(cfg['peak_hour_end'])} {cfg['timezone']} "
        f"x{fmt(cfg['peak_worker_multiplier'])}" + (" (now)" if lim["peak"] else ""))
    say(f"limits     {lim['max_renders']} renders, {lim['max_manim']} manim in effect "
           f"(configured {cfg['max_concurrent_renders']}, {cfg['max_manim_renders']}); peak hours {peak}; "
           f"timeout {cfg['job_timeout_minutes']} min")
    if lim["paused"]:
        p = st.pause
        since = "" if p is None else f" since {fmt(p['paused_at'])} by {p['paused_by']}"
        back = "" if p is None else f"; `reactor resume` restores {p['previous']}"
        say(f"           PAUSED{since}: no new render starts{back}")
    say(f"reactors   {len(st.reactors_alive)} alive (heartbeat within {st.alive_within_s:g} s)")
    for r in st.reactors_alive:
        say(f"           {r['id']} on {r['hostname']} pid {r['pid']} v{r['version']}, "
               f"up since {fmt(r['started_at'])}, beat {ago(r['silent_seconds'])} ago")
        if r.get("circuit_state", "closed") != "closed":
            say(f"           RENDER FARM UNREACHABLE for {r['id']}: circuit {r['circuit_state']} "
                   f"since {fmt(r['circuit_since'])}; queued jobs wait, no retry is spent")
    for r in st.reactors_silent:
        say(f"           silent: {r['id']} on {r['hostname']}, last beat {ago(r['silent_seconds'])} ago")
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
            f"{j['retry_count']}/{j['max_retries']}", fmt(j["created_at"]), error,
        ])
    return rows


def _cmd_jobs(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, list_jobs, parse_uuid

    user = parse_uuid(args.user, "--user") if args.user else None
    with connect(resolve_dsn(args.dsn, env)) as conn:
        jobs = list_jobs(conn, status=args.status, job_type=args.type, user_id=user, limit=args.limit)
    if args.json:
        print_json(jobs)
        return 0
    if not jobs:
        say("no jobs")
        return 0
    table(["ID", "TYPE", "PRIORITY", "STATUS", "POS", "RETRIES", "CREATED", "ERROR"], _job_rows(jobs))
    return 0


@_refusal_exits_1
def _cmd_show(args: argparse.Namespace, env: Environment) -> int:
    import json

    from reactor.ops.runbook import connect, parse_uuid, show_job

    job_id = parse_uuid(args.id)
    with connect(resolve_dsn(args.dsn, env)) as conn:
        detail = show_job(conn, job_id)
    if args.json:
        print_json(detail)
        return 0
    for key, value in detail.job.items():
        if key in ("payload", "result", "error_details") and value is not None:
            text = json.dumps(value, indent=2, ensure_ascii=False, default=json_default)
            say(f"{key + ':':<18}{text.replace(chr(10), chr(10) + ' ' * 18)}")
        else:
            say(f"{key + ':':<18}{fmt(value)}")
    say()
    say(f"events ({len(detail.events)}):")
    table(
        ["SEQ", "AT", "KIND", "STATUS", "RETRIES", "ERROR", "ACTOR"],
        [[str(e["seq"]), fmt(e["at"]), str(e["kind"]),
          f"{e['old_status']} -> {e['status']}" if e["old_status"] else str(e["status"] or ""),
          "" if e["retry_count"] is None else str(e["retry_count"]), str(e["error_category"] or ""),
          str(e["actor"] or "")] for e in detail.events],
    )
    return 0


@_refusal_exits_1
def _cmd_retry(args: argparse.Namespace, env: Environment) -> int:
    from reactor.core.errors import ConfigError
    from reactor.ops.runbook import connect, parse_duration, parse_uuid, retry_failed_since, retry_job

    if (args.id is None) == (args.failed_since is None):
        raise ConfigError("give a job id, or --failed-since DURATION (e.g. 2h), not both")
    job_id = parse_uuid(args.id) if args.id else None
    since = parse_duration(args.failed_since) if args.failed_since else None
    with connect(resolve_dsn(args.dsn, env)) as conn:
        if job_id is not None:
            job = retry_job(conn, job_id)
            if args.json:
                print_json(job)
            else:
                say(f"queued {job['id']} again ({job['job_type']}, {job['priority']}), "
                       f"queue position {job['queue_position']}, retries 0/{job['max_retries']}")
            return 0
        assert since is not None
        jobs = retry_failed_since(conn, since)
    if args.json:
        print_json(jobs)
        return 0
    if not jobs:
        say(f"no job failed in the last {args.failed_since}")
        return 0
    say(f"queued {len(jobs)} failed job{'s' if len(jobs) != 1 else ''} again:")
    table(["ID", "TYPE", "PRIORITY", "FAILED", "WAS"],
           [[str(j["id"]), str(j["job_type"]), str(j["priority"]), fmt(j["failed_at"]),
             f"{j['was_category'] or ''}: {j['was_message'] or ''}"[:70]] for j in jobs])
    return 0


@_refusal_exits_1
def _cmd_cancel(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import cancel_job, connect, parse_uuid

    job_id = parse_uuid(args.id)
    with connect(resolve_dsn(args.dsn, env)) as conn:
        res = cancel_job(conn, job_id)
    if args.json:
        print_json({"job": res.job, "was": res.was, "changed": res.changed, "held_by": res.held_by})
    elif not res.changed:
        say(f"job {job_id} was cancelled already")
    elif res.was == "processing":
        say(f"cancelled {job_id} (was processing on {res.held_by or 'no reactor'}: "
               "the reactor aborts the render when it sees the change)")
    else:
        say(f"cancelled {job_id} (was queued: it will not start)")
    return 0


def _cmd_prune(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, prune

    with connect(resolve_dsn(args.dsn, env)) as conn:
        done = prune(conn, dry_run=args.dry_run, batch=args.batch)
    if args.json:
        print_json(done)
        return 0
    p = done.preview
    say(f"retention  {p['retention']}: finished before {fmt(p['cutoff'])}")
    what = (f"{p['jobs']} jobs ({p['completed']} completed, {p['failed']} failed, {p['cancelled']} cancelled) "
            f"and {p['events']} events")
    if p["jobs"]:
        what += f", finished {fmt(p['oldest'])} to {fmt(p['newest'])}"
    if done.dry_run:
        say(f"would go   {what}")
    else:
        say(f"deleted    {done.jobs_pruned} jobs and {done.events_pruned} events in {done.batches} batches "
            f"(found {what})")
    return 0


def _cmd_requeue_stuck(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, requeue_stuck

    with connect(resolve_dsn(args.dsn, env)) as conn:
        swept = requeue_stuck(conn, grace_s=args.grace_seconds, orphan_s=args.orphan_seconds)
    if args.json:
        print_json(swept)
        return 0
    if not swept:
        say("nothing stuck")
        return 0
    say(f"took back {len(swept)} job{'s' if len(swept) != 1 else ''}:")
    table(["ID", "NOW", "REASON", "HELD BY"],
           [[str(r["id"]), str(r["status"]), str(r["reason"]), str(r["held_by"] or "-")] for r in swept])
    return 0


def _cmd_pause(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, pause

    with connect(resolve_dsn(args.dsn, env)) as conn:
        res = pause(conn)
    if args.json:
        print_json(res)
    elif res.changed:
        say(f"paused: no new render starts (max_concurrent_renders 0, was {res.previous}); renders in "
               "flight finish. Undo with `reactor resume`.")
    else:
        since = f" since {fmt(res.paused_at)} by {res.paused_by}" if res.paused_at else ""
        say(f"paused already{since}" + (f"; `reactor resume` restores {res.previous}" if res.previous else ""))
    return 0


def _cmd_resume(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, resume

    with connect(resolve_dsn(args.dsn, env)) as conn:
        res = resume(conn, to=args.to)
    if args.json:
        print_json(res)
    elif not res.changed:
        say(f"not paused: max_concurrent_renders is {res.max_concurrent_renders}")
    else:
        why = {"--to": "as asked", "remembered": "the value before the pause",
               "default": "the default: no earlier value was remembered"}[res.source]
        say(f"resumed: max_concurrent_renders {res.max_concurrent_renders} ({why})")
    return 0


def _cmd_config_show(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import config_show, connect

    with connect(resolve_dsn(args.dsn, env)) as conn:
        cfg = config_show(conn)
    if args.json:
        print_json(cfg)
        return 0
    width = max(len(k) for k in cfg)
    for key, value in cfg.items():
        say(f"{key:<{width}}  {fmt(value)}")
    return 0


def _cmd_config_set(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import config_set, connect, parse_assignments

    assignments = parse_assignments(args.assignments)
    with connect(resolve_dsn(args.dsn, env)) as conn:
        cfg = config_set(conn, assignments)
    if args.json:
        print_json(cfg)
        return 0
    for key in assignments:
        say(f"{key} = {fmt(cfg[key])}")
    return 0


def _cmd_submit(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, parse_uuid, submit

    user = parse_uuid(args.user, "--user") if args.user else None
    with connect(resolve_dsn(args.dsn, env)) as conn:
        job = submit(conn, job_type=args.type, payload=args.payload, input_text=args.input,
                     priority=args.priority, user_id=user)
    if args.json:
        print_json(job)
    else:
        say(f"{job['id']} queue_position {job['queue_position']} ({job['job_type']}, {job['priority']}, "
               f"renderer {job['renderer']})")
    return 0


def _cmd_check(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.checks import check

    url = args.orchestrator_url or env.orchestrator_url
    results = check(resolve_dsn(args.dsn, env), orchestrator_url=url, listen_timeout_s=args.listen_timeout,
                    pgport=env.pgport)
    ok = all(r.ok for r in results)
    if args.json:
        print_json({"ok": ok, "checks": results})
    else:
        width = max(len("orchestrator"), *(len(r.name) for r in results))
        for r in results:
            mark = "ok" if r.ok else ("skip" if r.ok is None else "FAIL")
            say(f"{mark:<5} {r.name:<{width}}  {r.detail}")
        if url is None:
            say(f"{'-':<5} {'orchestrator':<{width}}  not checked: pass --orchestrator-url URL")
    return 0 if ok else 1


def _cmd_schedules_list(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, list_schedules

    with connect(resolve_dsn(args.dsn, env)) as conn:
        rows = list_schedules(conn)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        say("no schedules (add one with INSERT INTO job_schedules)")
        return 0
    table(["NAME", "CRON", "TIMEZONE", "TYPE", "CATCH_UP", "ENABLED", "NEXT RUN", "LAST RUN", "JOBS"],
          [[str(r["name"]), str(r["cron"]), str(r["timezone"]), str(r["job_type"]), str(r["catch_up"]),
            "yes" if r["enabled"] else "no", fmt(r["next_run_at"]) if r["next_run_at"] else "-",
            fmt(r["last_run_at"]) if r["last_run_at"] else "-", str(r["jobs_created"])] for r in rows])
    return 0


@_refusal_exits_1
def _cmd_schedules_enable(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, set_schedule_enabled

    enabled = args.schedules_command == "enable"
    with connect(resolve_dsn(args.dsn, env)) as conn:
        row = set_schedule_enabled(conn, args.name, enabled)
    if args.json:
        print_json(row)
    elif enabled:
        say(f"schedule {row['name']} enabled; next run {fmt(row['next_run_at'])}")
    else:
        say(f"schedule {row['name']} disabled")
    return 0


@_refusal_exits_1
def _cmd_schedules_run_now(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.runbook import connect, run_schedule_now

    with connect(resolve_dsn(args.dsn, env)) as conn:
        job = run_schedule_now(conn, args.name)
    if args.json:
        print_json(job)
    else:
        say(f"job {job['id']} ({job['job_type']}, {job['priority']}) queued for schedule {args.name}")
    return 0


def add_ops_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        add_dsn(p)
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

    p = sub.add_parser("prune", help="delete finished jobs older than job_retention, with their events, now")
    common(p)
    p.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    p.add_argument("--batch", type=int, default=1000, help="jobs deleted per transaction (default 1000)")
    p.set_defaults(func=_cmd_prune)

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

    p = sub.add_parser("schedules", help="periodic schedules (job_schedules): list, enable, disable, run-now")
    common(p)
    p.set_defaults(func=_cmd_schedules_list)
    schedules_sub = p.add_subparsers(dest="schedules_command")
    q = schedules_sub.add_parser("list", help="every schedule with its next and last run (the default)")
    common(q)
    q.set_defaults(func=_cmd_schedules_list)
    for name, what in (("enable", "enable a schedule: its next slot from now on (exit 1: no such schedule)"),
                       ("disable", "disable a schedule: no job until enabled (exit 1: no such schedule)"),
                       ("run-now", "one job of the schedule now; its slots are unchanged (exit 1: no such "
                                   "schedule)")):
        q = schedules_sub.add_parser(name, help=what)
        common(q)
        q.add_argument("name", help="the schedule's name")
        q.set_defaults(func=_cmd_schedules_run_now if name == "run-now" else _cmd_schedules_enable)

    p = sub.add_parser("check", help="pre-flight: database, LISTEN/NOTIFY, not a transaction pooler, "
                                     "migrations, orchestrator (exit 1 if any fails)")
    common(p)
    p.add_argument("--orchestrator-url", help="check GET URL/health ($REACTOR_ORCHESTRATOR_URL)")
    p.add_argument("--listen-timeout", type=float, default=5.0,
                   help="how long to wait for the NOTIFY round trip (default 5 s)")
    p.set_defaults(func=_cmd_check)
