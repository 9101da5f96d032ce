"""The orchestrator client: one ``POST /render`` per attempt, failures mapped to categories."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import anyio
import httpx
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

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(None, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            headers={"user-agent": "reactor"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def render(self, request: RenderRequest, timeout_s: float) -> RenderResult:
        body = request.model_dump(mode="json")
        try:
            with anyio.fail_after(timeout_s):
                response = await self._client.post("/render", json=body)
        except TimeoutError as exc:
            raise RenderError("TIMEOUT", f"no answer within the deadline of {timeout_s:g} s") from exc
        except httpx.ConnectError as exc:
            raise _transport_error(f"cannot connect to the orchestrator: {exc}") from exc
        except httpx.ConnectTimeout as exc:
            raise _transport_error("connecting to the orchestrator timed out") from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise _transport_error(f"connection reset by the orchestrator: {exc!r}") from exc
        except httpx.TimeoutException as exc:
            raise RenderError("TIMEOUT", f"orchestrator timed out: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise RenderError("UNKNOWN", f"render call failed: {exc!r}") from exc
        return _read_answer(response)

    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when ``GET /health`` answers 2xx."""
        try:
            with anyio.fail_after(timeout_s):
                response = await self._client.get("/health")
        except (TimeoutError, httpx.HTTPError):
            return False
        return response.is_success


def _transport_error(message: str) -> RenderError:
    err = RenderError("TIMEOUT", message)
    err.transport = True
    return err


def _read_answer(response: httpx.Response) -> RenderResult:
    text = response.text
    if not response.is_success:
        category = category_for_status(response.status_code)
        retry_after = parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC))
        raise RenderError(
            category,
            f"orchestrator answered {response.status_code}",
            status_code=response.status_code,
            body=text[:BODY_EXCERPT],
            retry_after=retry_after,
        )
    try:
        return RenderResult.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError, TypeError) as exc:
        raise RenderError(
            "UNKNOWN",
            f"malformed answer from the orchestrator: {_short(exc)}",
            status_code=response.status_code,
            body=text[:BODY_EXCERPT],
        ) from exc


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
    return str(exc)[:200]
