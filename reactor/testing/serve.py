"""Run the orchestrator double as a process: ``reactor dev-orchestrator`` (the CLI adds these
options), or alone, ``python -m reactor.testing.serve --port 8700 --latency-ms 200``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from reactor.testing._outcomes import parse_mix
from reactor.testing.orchestrator import OrchestratorDouble

__all__ = ["add_arguments", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dev-orchestrator`` options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8700, help="port to listen on (0: any)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="render latency in ms")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="extra uniform random latency, up to this (ms)")
    parser.add_argument(
        "--mix",
        default=None,
        help="outcome weights, e.g. ok=90,status:500=5,hang=5 (default: ok=1)",
    )
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds on 503 and 429")
    parser.add_argument("--health-status", type=int, default=200, help="status that GET /health answers")
    parser.add_argument("--seed", type=int, default=None, help="seed of the outcome mix")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the double until SIGINT or SIGTERM; return the exit status."""
    try:
        double = OrchestratorDouble(
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            mix=parse_mix(args.mix) if args.mix else None,
            retry_after_s=args.retry_after,
            health_status=getattr(args, "health_status", 200),
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2

    async def serve() -> int:
        try:
            url = await double.start(args.host, args.port)
        except OSError as exc:
            print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)  # noqa: T201
            return 1
        print(f"orchestrator double listening on {url}", flush=True)  # noqa: T201
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await double.stop()
        return 0

    try:
        try:
            import uvloop  # the benchmarks drive >1,000 renders/s through this double
        except ImportError:
            return asyncio.run(serve())
        return uvloop.run(serve())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m reactor.testing.serve",
        description="Run the orchestrator double (a test double of the Video Orchestrator API).",
    )
    add_arguments(_parser)
    _parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    _args = _parser.parse_args()
    logging.basicConfig(
        level=getattr(logging, str(_args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(run_from_args(_args))
