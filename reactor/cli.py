"""The ``reactor`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reactor import __version__
from reactor.config import resolve_dsn
from reactor.errors import ReactorError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("reactor")


def _add_dsn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", help="PostgreSQL DSN (default: $DATABASE_URL)")


def _cmd_migrate(args: argparse.Namespace) -> int:
    from reactor.migrations import migrate_down, migrate_up

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
    from reactor.embedded import EmbeddedPostgres, default_data_dir
    from reactor.migrations import migrate_up

    server = EmbeddedPostgres(default_data_dir())
    url = server.start()
    migrate_up(url)
    logger.info("no --dsn or DATABASE_URL: using the embedded PostgreSQL", extra={"dsn": url})
    return url


def _orchestrator_url(value: str | None) -> str:
    import os

    from reactor.errors import ConfigError

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


def _service_settings(args: argparse.Namespace, dsn: str, orchestrator: str) -> object:
    from reactor.dispatch import DispatchSettings
    from reactor.service import ServiceSettings, new_reactor_id

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
    )


def _cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from reactor.service import Service, ServiceSettings

    orchestrator = _orchestrator_url(args.orchestrator_url)
    dsn = _dsn_or_embedded(args.dsn)
    settings = _service_settings(args, dsn, orchestrator)
    assert isinstance(settings, ServiceSettings)
    service = Service(settings)
    anyio.run(service.run, backend="asyncio")
    return 0


def _cmd_dev_orchestrator(args: argparse.Namespace) -> int:
    from reactor import devorch

    return devorch.run_from_args(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from reactor import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reactor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reactor {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply the schema migrations (or roll them back with --down)")
    _add_dsn(p)
    p.add_argument("--down", action="store_true", help="roll back: remove what the migrations created")
    p.add_argument("--to", type=int, help="with --down: stop at this version (default 0: all)")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("run", help="run the reactor")
    _add_dsn(p)
    p.add_argument("--orchestrator-url", help="Video Orchestrator base URL ($REACTOR_ORCHESTRATOR_URL)")
    _add_run_options(p)
    p.add_argument("--journald", action="store_true", help="log to stdout with <N> priority prefixes")
    p.set_defaults(func=_cmd_run)

    from reactor import devorch

    p = sub.add_parser("dev-orchestrator", help="run the orchestrator test double (for demos and tests)")
    devorch.add_arguments(p)
    p.set_defaults(func=_cmd_dev_orchestrator)

    p = sub.add_parser("demo", help="everything on this machine: private PostgreSQL, orchestrator double, "
                                    "reactor and a stream of sample jobs")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    p.add_argument("--rate", type=float, default=2.0, help="sample jobs submitted per second")
    p.add_argument("--fresh", action="store_true", help="start from an empty database")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from reactor.logs import setup_logging

    setup_logging(str(args.log_level), journald=bool(getattr(args, "journald", False)))
    try:
        rc: int = args.func(args)
    except ReactorError as exc:
        print(f"reactor: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 130
    return rc
