"""The orchestrator client: one ``POST /render`` per attempt, failures mapped to categories.

aiohttp carries the render calls: it is the render hot path, and on this project's 2-core
benchmark machine httpx spent about 1.9 ms of CPU per request (400-700 requests/s) where aiohttp
spends a fraction of that, so the HTTP client, not PostgreSQL, was the throughput ceiling.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import aiohttp
import anyio
from pydantic import ValidationError

from reactor.errors import RenderError
from reactor.models import RenderRequest, RenderResult
from reactor.policy import category_for_status, parse_retry_after

__all__ = ["RenderClient"]

logger = logging.getLogger(__name__)

BODY_EXCERPT = 500


class RenderClient:
    """Calls the Video Orchestrator. ``render`` returns a validated result or raises RenderError.

    ``RenderError.transport`` is true when the orchestrator could not be reached or dropped the
    connection (refused, reset, connect timeout), as opposed to an answer about the job.
    """

    def __init__(self, base_url: str, *, connect_timeout: float = 5.0, max_connections: int = 100) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                headers={"user-agent": "reactor"},
                json_serialize=json.dumps,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def render(self, request: RenderRequest, timeout_s: float) -> RenderResult:
        body = request.to_json()
        # the deadline is aiohttp's own total timeout (one timer per call, cheaper than a cancel
        # scope): when it passes the request is cancelled and its connection closed
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.connect_timeout)
        try:
            async with self._client().post(f"{self.base_url}/render", json=body, timeout=timeout) as response:
                text = await response.text()
                status = response.status
                retry_after_header = response.headers.get("retry-after")
        except (aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError) as exc:
            raise _transport_error("connecting to the orchestrator timed out") from exc
        except TimeoutError as exc:
            raise RenderError("TIMEOUT", f"no answer within the deadline of {timeout_s:g} s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise _transport_error(f"cannot connect to the orchestrator: {exc}") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            raise _transport_error(f"connection reset by the orchestrator: {exc!r}") from exc
        except aiohttp.ClientError as exc:
            raise RenderError("UNKNOWN", f"render call failed: {exc!r}") from exc
        return _read_answer(status, text, retry_after_header)

    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when ``GET /health`` answers 2xx."""
        try:
            with anyio.fail_after(timeout_s):
                async with self._client().get(f"{self.base_url}/health") as response:
                    await response.read()
                    return 200 <= response.status < 300
        except (TimeoutError, aiohttp.ClientError):
            return False


def _transport_error(message: str) -> RenderError:
    err = RenderError("TIMEOUT", message)
    err.transport = True
    return err


def _read_answer(status: int, text: str, retry_after_header: str | None) -> RenderResult:
    if not 200 <= status < 300:
        category = category_for_status(status)
        retry_after = parse_retry_after(retry_after_header, datetime.now(UTC))
        raise RenderError(
            category,
            f"orchestrator answered {status}",
            status_code=status,
            body=text[:BODY_EXCERPT],
            retry_after=retry_after,
        )
    try:
        return RenderResult.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError, TypeError) as exc:
        raise RenderError(
            "UNKNOWN",
            f"malformed answer from the orchestrator: {_short(exc)}",
            status_code=status,
            body=text[:BODY_EXCERPT],
        ) from exc


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
    return str(exc)[:200]
