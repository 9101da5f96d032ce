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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        rc: int = args.func(args)
    except ReactorError as exc:
        print(f"reactor: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 130
    return rc
