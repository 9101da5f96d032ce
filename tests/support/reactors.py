"""Helpers to run reactors and wait for database states in tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

import anyio
import psycopg

from reactor.engine.dispatcher import DispatchSettings
from reactor.service import Service, ServiceSettings

FAST_DISPATCH = DispatchSettings(
    lease_s=5.0, renew_every_s=1.0, drain_grace_s=5.0, backoff_base_s=0.05, backoff_cap_s=0.2,
)


@asynccontextmanager
async def running_reactor(
    dsn: str,
    orchestrator_url: str,
    *,
    dispatch: DispatchSettings = FAST_DISPATCH,
    clock: Callable[[], datetime] | None = None,
    sweep_every_s: float = 30.0,
    reactor_id: str | None = None,
) -> AsyncIterator[Service]:
    settings = ServiceSettings(
        dsn=dsn, orchestrator_url=orchestrator_url, dispatch=dispatch, handle_signals=False,
        sweep_every_s=sweep_every_s,
    )
    if reactor_id:
        settings = replace(settings, reactor_id=reactor_id)
    async with running_service(Service(settings, clock=clock)) as service:
        yield service


@asynccontextmanager
async def running_service(service: Service) -> AsyncIterator[Service]:
    """Run a service until the block ends, then stop it (gracefully: it drains)."""
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        try:
            yield service
        finally:
            service.request_stop()


async def wait_for(
    dsn: str, sql: str, params: tuple[Any, ...] = (), *, expect: Callable[[Any], bool] = bool,
    timeout: float = 30.0,
) -> Any:
    """Poll a query (the test's own connection) until ``expect(first column)`` holds."""
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            value = row[0] if row else None
            if expect(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting: {sql} -> {value!r}")
            await anyio.sleep(0.05)
