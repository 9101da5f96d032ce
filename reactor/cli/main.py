"""The ``reactor`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reactor import __version__
from reactor.cli.output import say
from reactor.cli.runbook import add_ops_commands
from reactor.cli.settings import add_dsn, orchestrator_url, resolve_dsn, service_settings
from reactor.core.environment import Environment
from reactor.core.errors import ConfigError, ReactorError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("reactor")


def _cmd_migrate(args: argparse.Namespace, env: Environment) -> int:
    from reactor.db.migrations import migrate_down, migrate_up

    if getattr(args, "supabase", False):
        return _cmd_migrate_supabase(args, env)
    dsn = resolve_dsn(args.dsn, env)
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


def _dsn_or_embedded(dsn: str | None, env: Environment) -> str:
    """--dsn, else DATABASE_URL, else the embedded PostgreSQL (started and migrated if needed)."""
    if dsn or env.database_url:
        return resolve_dsn(dsn, env)
    from reactor.db.embedded import EmbeddedPostgres, default_data_dir
    from reactor.db.migrations import migrate_up

    server = EmbeddedPostgres(default_data_dir(env), env=env)
    url = server.start()
    migrate_up(url)
    logger.info("no --dsn or DATABASE_URL: using the embedded PostgreSQL", extra={"dsn": url})
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


def _cmd_run(args: argparse.Namespace, env: Environment) -> int:
    import anyio

    from reactor.service import Service

    orchestrator = orchestrator_url(args.orchestrator_url, env)
    dsn = _dsn_or_embedded(args.dsn, env)
    if not args.allow_pooler_port:
        from reactor.ops.checks import transaction_pooler_reason

        reason = transaction_pooler_reason(dsn, env.pgport)
        if reason is not None:
            raise ConfigError(f"not starting: {reason} (a server that really listens on 6543 "
                              "directly: pass --allow-pooler-port)")
    service = Service(service_settings(args, env, dsn, orchestrator))
    anyio.run(service.run, backend="asyncio", backend_options=_loop_options())
    return 0


def _loop_options() -> dict[str, bool]:
    """uvloop when it is installed: it halves the reactor's CPU per job (bench/reactor_bench.py)."""
    import importlib.util

    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def _cmd_dev_orchestrator(args: argparse.Namespace, env: Environment) -> int:
    from reactor.testing import serve as devorch

    return devorch.run_from_args(args)


def _cmd_demo(args: argparse.Namespace, env: Environment) -> int:
    from reactor.cli import demo

    return demo.run(args, env)


def _cmd_migrate_supabase(args: argparse.Namespace, env: Environment) -> int:
    """`reactor migrate --supabase`: the numbered migrations, then the optional Supabase hardening;
    with --down, roll back the hardening alone."""
    from reactor.db.migrations import migrate_optional_down, migrate_optional_up, migrate_up

    dsn = resolve_dsn(args.dsn, env)
    if args.to is not None:
        raise ConfigError("--to does not go with --supabase (the hardening is rolled back alone, or by --down)")
    if args.down:
        undone = migrate_optional_down(dsn, "supabase")
        say("rolled back supabase (optional)" if undone else "supabase (optional) is not applied: nothing to do")
        return 0
    applied = migrate_up(dsn)
    for m in applied:
        say(f"applied {m.version:04d}_{m.name}")
    if not applied:
        say("schema is up to date")
    done = migrate_optional_up(dsn, "supabase")
    say("applied supabase (optional)" if done else "supabase (optional) is applied already")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reactor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reactor {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply the schema migrations (or roll them back with --down)")
    add_dsn(p)
    p.add_argument("--down", action="store_true", help="roll back: remove what the migrations created")
    p.add_argument("--to", type=int, help="with --down: stop at this version (default 0: all)")
    p.add_argument("--supabase", action="store_true",
                   help="also apply the optional Supabase hardening (row level security, rate limit); "
                        "with --down: roll back only that")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("run", help="run the reactor")
    add_dsn(p)
    p.add_argument("--orchestrator-url", help="Video Orchestrator base URL ($REACTOR_ORCHESTRATOR_URL)")
    _add_run_options(p)
    p.add_argument("--journald", action="store_true", help="log to stdout with <N> priority prefixes")
    p.add_argument("--alert-webhook", metavar="URL",
                   help="POST alerts (firing and resolved) here as JSON with a Slack-compatible text "
                        "($REACTOR_ALERT_WEBHOOK)")
    p.set_defaults(func=_cmd_run)

    from reactor.testing import serve as devorch

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
    add_dsn(p)
    p.add_argument("--rest-url", help="submit through PostgREST at this base URL instead of SQL")
    p.add_argument("--rest-key", help="PostgREST key (apikey and Bearer) ($REACTOR_REST_KEY)")
    p.add_argument("--type", dest="job_type", default="topic_short", help="job type (default topic_short)")
    p.add_argument("--input", default="reactor smoke test", help="the text to render")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for completion (default 90)")
    p.add_argument("--max-retries", type=int, default=0,
                   help="retries the smoke job may spend (default 0: report the first failure)")
    p.set_defaults(func=_cmd_smoke)

    add_ops_commands(sub)
    return parser


def _cmd_smoke(args: argparse.Namespace, env: Environment) -> int:
    from reactor.ops.smoke import SmokeFailed, SmokeSettings, run_smoke

    rest_key = args.rest_key or env.rest_key
    dsn = None if args.rest_url else resolve_dsn(args.dsn, env)
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
        rc: int = args.func(args, Environment.read())
    except ReactorError as exc:
        print(f"reactor: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 130
    return rc
