"""The alert webhook: one JSON POST per alert transition, Slack-compatible (``text``) and structured.

Posts go out one at a time, in order. Connection errors, 408, 429 and 5xx are retried with
exponential backoff and jitter (``webhook_backoff_s`` doubling, at most ``webhook_backoff_cap_s``;
``Retry-After`` honoured up to the cap), ``webhook_attempts`` times in all; other answers are not.
Delivery is at most once (reactor/ops/alerts.py says why).
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import httpx
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from reactor import __version__
from reactor.core.backoff import backoff

if TYPE_CHECKING:
    from reactor.ops.alerts import AlertSettings, Transition

__all__ = ["Webhook"]

logger = logging.getLogger(__name__)


def _where(url: str) -> str:
    """A webhook URL for the log: scheme and host only (the path of a Slack webhook is its secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/…"


class Webhook:
    """Posts transitions one at a time, in order, retrying failures with bounded backoff."""

    def __init__(self, url: str, settings: AlertSettings, *, rng: random.Random | None = None) -> None:
        self.url = url
        self.settings = settings
        self.rng = rng or random.Random()
        self.delivered = 0
        self.abandoned = 0
        send: MemoryObjectSendStream[Transition]
        receive: MemoryObjectReceiveStream[Transition]
        send, receive = anyio.create_memory_object_stream(100)
        self._send, self._receive = send, receive

    def submit(self, t: Transition) -> None:
        try:
            self._send.send_nowait(t)
        except anyio.WouldBlock:
            self.abandoned += 1
            logger.error("alert webhook backlog full: dropping %s %s", t.name, t.status)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        async with httpx.AsyncClient(
            timeout=s.webhook_timeout_s, follow_redirects=False,
            headers={"User-Agent": f"reactor/{__version__}"},
        ) as client:
            task_status.started()
            try:
                async for t in self._receive:
                    await self.deliver(client, t)
            finally:
                # stopping: one quick try for what is still waiting, without holding up the stop
                with anyio.CancelScope(shield=True), anyio.move_on_after(3.0):
                    while True:
                        try:
                            t = self._receive.receive_nowait()
                        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                            break
                        await self.deliver(client, t, attempts=1)

    async def deliver(self, client: httpx.AsyncClient, t: Transition, *, attempts: int | None = None) -> bool:
        s = self.settings
        tries = attempts or max(1, s.webhook_attempts)
        extra = {"alert": t.name, "status": t.status, "webhook": _where(self.url)}
        for attempt in range(1, tries + 1):
            retry_after: float | None = None
            try:
                response = await client.post(self.url, json=t.payload())
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"[:300]
            else:
                if response.is_success:
                    self.delivered += 1
                    logger.info("alert webhook delivered", extra={**extra, "attempt": attempt})
                    return True
                problem = f"HTTP {response.status_code}"
                if response.status_code not in (408, 429) and response.status_code < 500:
                    self.abandoned += 1
                    logger.error("alert webhook refused the post (%s); not retried", problem, extra=extra)
                    return False
                retry_after = _retry_after(response.headers.get("Retry-After"))
            if attempt == tries:
                break
            delay = backoff(attempt - 1, base=s.webhook_backoff_s, cap=s.webhook_backoff_cap_s, rng=self.rng)
            if retry_after is not None:
                delay = max(delay, min(retry_after, s.webhook_backoff_cap_s))
            logger.warning("alert webhook failed (%s); retry %d/%d in %.1f s", problem, attempt, tries - 1, delay,
                           extra=extra)
            await anyio.sleep(delay)
        self.abandoned += 1
        logger.error("alert webhook failed %d times (%s); giving up", tries, problem, extra=extra)
        return False


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None
