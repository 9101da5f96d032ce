"""``reactor demo``: everything on one machine, with no set-up.

A private PostgreSQL (created on first use, run as an unprivileged user when root), the schema,
the orchestrator double, one reactor, and a stream of sample jobs submitted with plain SQL, a few
of them made to fail so that retries and error categories show in the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import secrets
import signal
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import anyio
import anyio.to_thread
import jwt

from reactor.core.environment import Environment
from reactor.core.errors import MigrationError
from reactor.db.embedded import EmbeddedPostgres, default_data_dir
from reactor.db.migrations import migrate_up
from reactor.db.session import Session
from reactor.ops.systemd import SystemdSettings
from reactor.service import Service, ServiceSettings
from reactor.testing.orchestrator import OrchestratorDouble
from reactor.web.auth import AuthSettings
from reactor.web.feed import FeedSettings

__all__ = ["run", "sample_job"]

logger = logging.getLogger(__name__)

#: the subject of the demo's admin token: its dashboard actions are recorded as admin:<this>
DEMO_ADMIN = UUID("00000000-0000-4000-8000-00000000ad01")

QUESTIONS = [
    "Why does the derivative of sin x equal cos x?",
    "How do I integrate x * e^x?",
    "What is the geometric meaning of a determinant?",
    "Why is the sum of angles in a triangle 180 degrees?",
    "How does compound interest grow over ten years?",
]
TOPICS = ["Photosynthesis", "Newton's third law", "The French Revolution", "Supply and demand", "Plate tectonics"]


def sample_job(rng: random.Random, today: date) -> tuple[str, str, dict[str, Any]]:
    """(job_type, priority, payload) for one sample job; about 1 in 12 is made to fail."""
    kind = rng.choices(["doubt", "topic_short", "daily_ca"], weights=[6, 3, 1])[0]
    priority = rng.choices(["high", "medium", "low"], weights=[2, 5, 3])[0]
    payload: dict[str, Any]
    if kind == "doubt":
        payload = {"question": rng.choice(QUESTIONS)}
    elif kind == "topic_short":
        payload = {"topic": rng.choice(TOPICS), "length": rng.choice(["short", "medium"])}
    else:
        payload = {"date": (today - timedelta(days=rng.randint(0, 3))).isoformat()}
    field = {"doubt": "question", "topic_short": "topic", "daily_ca": "date"}[kind]
    roll = rng.random()
    if roll < 0.03:
        payload.pop(field)  # a bad payload: fails with INVALID_INPUT, never retried
    elif roll < 0.06:
        payload[field] += " [[fail_first=1:status=503]]"  # retried once, then completes
    elif roll < 0.08:
        payload[field] += " [[status=404]]"  # NOT_FOUND: failed at once
    return kind, priority, payload


async def _submit(dsn: str, rate: float, stop: anyio.Event) -> None:
    rng = random.Random()
    with await anyio.to_thread.run_sync(lambda: Session.connect(dsn, application_name=None)) as conn:
        while not stop.is_set():
            job_type, priority, payload = sample_job(rng, datetime.now(UTC).date())
            params = {"job_type": job_type, "priority": priority, "payload": json.dumps(payload)}
            row = await anyio.to_thread.run_sync(conn.one, "demo_submit", params)
            if row:
                logger.info(
                    "sample job submitted",
                    extra={"job_id": str(row["id"]), "job_type": job_type, "priority": priority,
                           "queue_position": row["queue_position"]},
                )
            with anyio.move_on_after(rng.expovariate(rate) if rate > 0 else 1.0):
                await stop.wait()


async def _main(args: argparse.Namespace, env: Environment) -> None:
    server = EmbeddedPostgres(default_data_dir(env), env=env)
    if args.fresh:
        server.destroy()
        server = EmbeddedPostgres(default_data_dir(env), env=env)
    dsn = server.start()
    try:
        migrate_up(dsn)
    except MigrationError as exc:
        raise MigrationError(f"{exc}\n(this is the demo's own database: start afresh with --fresh)") from exc
    secret = env.jwt_secret or secrets.token_urlsafe(32)
    feed = FeedSettings(auth=AuthSettings(jwt_secret=secret), host="127.0.0.1", port=args.port)
    admin = jwt.encode({"role": "service_role", "sub": str(DEMO_ADMIN), "email": "demo-admin@localhost",
                        "exp": int(time.time()) + 7 * 86400},
                       secret, algorithm="HS256")
    async with OrchestratorDouble(latency_ms=800, jitter_ms=1500) as orch:
        service = Service(ServiceSettings(dsn=dsn, orchestrator_url=orch.url, handle_signals=False, feed=feed,
                                          systemd=SystemdSettings.from_environment(env)))
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            assert service.feed is not None
            base = f"http://127.0.0.1:{service.feed.port}"
            print(  # noqa: T201
                "\nreactor demo\n"
                f"  dashboard     {base}/#token={admin}\n"
                f"  live feed     {service.feed.url} (metrics: {base}/metrics)\n"
                f"  database      {dsn}\n"
                f"  orchestrator  {orch.url}  (test double; GET {orch.url}/stats)\n"
                f"  submit a job  psql {dsn} -c \"INSERT INTO jobs (job_type, payload) "
                "VALUES ('doubt', '{\\\"question\\\": \\\"Why is the sky blue?\\\"}') RETURNING id, queue_position\"\n"
                f"  queue stats   psql {dsn} -c 'SELECT * FROM get_queue_stats()'\n"
                "  stop          Ctrl-C\n",
                flush=True,
            )
            tg.start_soon(_submit, dsn, args.rate, stop)

            async def _until_stopped() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    if args.duration > 0:
                        with anyio.move_on_after(args.duration):
                            async for _ in signals:
                                break
                    else:
                        async for _ in signals:
                            break
                stop.set()
                service.request_stop()

            tg.start_soon(_until_stopped)
        with Session.connect(dsn, application_name=None) as conn:
            row = conn.one("demo_summary")
        server.stop()
        if row:
            print(  # noqa: T201
                f"\nqueue now: queued={row['queued']} processing={row['processing']} "
                f"completed={row['completed']} failed={row['failed']} "
                f"avg_wait_s={row['avg_wait_s']}\nthe data is kept in {server.base_dir}; "
                "`reactor run --orchestrator-url URL` without --dsn starts it again\n",
                flush=True,
            )


def run(args: argparse.Namespace, env: Environment) -> int:
    anyio.run(_main, args, env, backend="asyncio")
    return 0
