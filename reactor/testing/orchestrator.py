"""Orchestrator double: a test double of the Video Orchestrator HTTP API.

This is **not** the real Video Orchestrator. It is a small, fast HTTP/1.1 server (asyncio streams,
keep-alive, no dependencies) that the demo, the tests and the benchmarks point the reactor at. It
answers render requests like the real API would, and lets you choose how each one goes: success,
error status, hang, malformed or non-JSON body, or a connection reset.

Endpoints
---------
``POST /render``
    Body ``{"job_id", "job_type", "input", "style", "length", "voice"}`` (only ``job_id`` is
    required; a body that is not a JSON object with a ``job_id`` gets ``400``). The double waits
    ``latency_ms`` plus a uniform random jitter in ``[0, jitter_ms]``, then answers according to
    the chosen outcome. On success: ``200`` with
    ``{"video_url": "<base>/videos/<job_id>.mp4", "thumbnail_url": "<base>/videos/<job_id>.jpg",
    "duration": <float seconds>, "processing_time_ms": <int>}`` (``duration`` is ``length`` when
    that is a number, else 42.0).
``GET /health``
    ``200 {"ok": true}``, or ``health_status`` when that was configured otherwise.
``GET|HEAD /videos/<name>``
    ``200`` with a few bytes (``video/mp4``; ``image/jpeg`` for ``.jpg``); honours a single
    ``Range: bytes=A-B`` with ``206`` and ``Content-Range``.
``GET /stats``
    ``{"received", "in_flight", "max_in_flight", "max_in_flight_by_type": {job_type: n},
    "outcomes": {outcome: n}, "aborted"}``. ``aborted`` counts renders whose client disconnected
    before the answer (this is how the reactor cancels a render).
``GET /requests``
    Every ``/render`` received, in arrival order: ``{"job_id", "job_type", "input", "style",
    "length", "voice", "received_at", "answered_at" (or null), "outcome", "aborted"}``.
``POST /reset``
    Clears the records, the counters and the ``fail_first`` attempt counts; keeps the settings.
``POST /control``
    Changes the behaviour at run time; any subset of ``{"latency_ms", "jitter_ms", "mix",
    "retry_after_s", "health_status", "seed"}``. Answers ``200`` with the full current settings
    (``400`` on an unknown key or a bad value, nothing changed).

Outcomes
--------
``ok``; ``status:<code>`` (400-599; ``503`` and ``429`` carry ``Retry-After: <retry_after_s>``);
``hang`` (never answers; ends when the client disconnects); ``malformed`` (``200`` with
``{"video": 1}``); ``garbage`` (``200`` with ``<html>oops``, not JSON); ``reset`` (the TCP
connection is reset without an answer).

How the outcome of a render is chosen (first match wins)
--------------------------------------------------------
1. Markers inside the ``input`` string (so tests pick a job's fate with plain SQL):
   ``[[status=500]]``, ``[[hang]]``, ``[[malformed]]``, ``[[garbage]]``, ``[[reset]]``,
   ``[[ok]]`` and ``[[fail_first=N:OUTCOME]]`` (e.g. ``[[fail_first=2:status=503]]``: the first
   2 requests for that ``job_id`` get ``status:503``, later ones succeed). When several outcome
   markers are present, the first one in the text wins. ``[[latency=2000]]`` replaces the
   latency and jitter for that request (ms) and combines with any other marker.
2. The global ``mix``: outcome -> weight, e.g. ``{"ok": 90, "status:500": 5, "hang": 5}``, drawn
   from a ``random.Random(seed)``; the default mix is ``{"ok": 1}``.

Use it from Python (``async with OrchestratorDouble(latency_ms=50) as orch: orch.url``) or run
it: ``python -m reactor.testing.serve --port 8700 --latency-ms 200 --mix ok=90,status:500=5,hang=5``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import struct
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote

from reactor.testing._outcomes import (
    OUTCOME_NAMES,
    Markers,
    parse_markers,
    parse_mix,
    validate_settings,
)
from reactor.testing._wire import (
    READ_CHUNK,
    BadRequest,
    Conn,
    Request,
    Response,
    as_text,
    encode_response,
    error,
    format_seconds,
    json_response,
    method_not_allowed,
    reason,
    video_response,
)

__all__ = ["OUTCOME_NAMES", "OrchestratorDouble", "parse_mix"]

logger = logging.getLogger(__name__)

_RETRY_AFTER_STATUSES = frozenset({429, 503})


# --------------------------------------------------------------------------------------------
# The double
# --------------------------------------------------------------------------------------------


class OrchestratorDouble:
    """A test double of the Video Orchestrator API (see the module docstring)."""

    def __init__(
        self,
        *,
        latency_ms: float = 0,
        jitter_ms: float = 0,
        mix: Mapping[str, float] | None = None,
        retry_after_s: float = 1.0,
        health_status: int = 200,
        seed: int | None = None,
    ) -> None:
        self._latency_ms = 0.0
        self._jitter_ms = 0.0
        self._mix: dict[str, float] = {"ok": 1.0}
        self._mix_outcomes: list[str] = ["ok"]
        self._mix_cum_weights: list[float] = [1.0]
        self._retry_after_s = 1.0
        self._health_status = 200
        self._video_base: str | None = None
        self._seed: int | None = None
        self._rng = random.Random()
        self._jitter_rng = random.Random()
        settings: dict[str, Any] = {
            "latency_ms": latency_ms,
            "jitter_ms": jitter_ms,
            "retry_after_s": retry_after_s,
            "health_status": health_status,
            "seed": seed,
        }
        if mix is not None:
            settings["mix"] = mix
        self.configure(**settings)
        if seed is None:
            self._reseed(None)

        self._server: asyncio.Server | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._stopping = False
        self._connections: dict[asyncio.Task[Any], Conn] = {}
        self._reset_state()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); return the base URL."""
        if self._server is not None:
            raise RuntimeError("the orchestrator double is already running")
        server = await asyncio.start_server(self._handle, host, port, reuse_address=True, limit=READ_CHUNK)
        self._server = server
        self._host = host
        self._port = int(server.sockets[0].getsockname()[1])
        logger.debug("orchestrator double listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        """Close the listener and every open connection (in-flight renders are dropped)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        try:
            server.close()
            for conn in list(self._connections.values()):
                conn.writer.transport.abort()
            tasks = list(self._connections)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()
        finally:
            self._stopping = False
        logger.debug("orchestrator double on port %s stopped", self._port)

    async def __aenter__(self) -> OrchestratorDouble:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port it listens (or last listened) on."""
        if self._port is None:
            raise RuntimeError("the orchestrator double has not been started")
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:43123`` (kept after ``stop()``)."""
        host = self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # -- settings ----------------------------------------------------------------------------

    def configure(self, **settings: Any) -> None:
        """Change the behaviour; same keys as ``POST /control``. Raises ValueError (no change)."""
        new = validate_settings(settings)

        if "latency_ms" in new:
            self._latency_ms = new["latency_ms"]
        if "jitter_ms" in new:
            self._jitter_ms = new["jitter_ms"]
        if "retry_after_s" in new:
            self._retry_after_s = new["retry_after_s"]
        if "health_status" in new:
            self._health_status = new["health_status"]
        if "mix" in new:
            mix: dict[str, float] = new["mix"]
            self._mix = mix
            self._mix_outcomes = list(mix)
            total = 0.0
            self._mix_cum_weights = []
            for weight in mix.values():
                total += weight
                self._mix_cum_weights.append(total)
        if "video_base" in new:
            self._video_base = new["video_base"]
        if "seed" in new:
            self._reseed(new["seed"])

    def _reseed(self, seed: int | None) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        self._jitter_rng = random.Random(None if seed is None else seed + 1)

    @property
    def settings(self) -> dict[str, Any]:
        """The current settings (what ``POST /control`` answers)."""
        return {
            "latency_ms": self._latency_ms,
            "jitter_ms": self._jitter_ms,
            "mix": dict(self._mix),
            "retry_after_s": self._retry_after_s,
            "health_status": self._health_status,
            "seed": self._seed,
            "video_base": self._video_base,
        }

    # -- records -----------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._received = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._in_flight_by_type: dict[str, int] = {}
        self._max_in_flight_by_type: dict[str, int] = {}
        self._outcomes: dict[str, int] = {}
        self._aborted = 0
        self._attempts: dict[str, int] = {}

    def reset(self) -> None:
        """Clear the records, counters and fail_first attempt counts (not the settings)."""
        self._reset_state()

    def stats(self) -> dict[str, Any]:
        """Counters; same content as ``GET /stats``."""
        return {
            "received": self._received,
            "in_flight": self._in_flight,
            "max_in_flight": self._max_in_flight,
            "max_in_flight_by_type": dict(self._max_in_flight_by_type),
            "outcomes": dict(self._outcomes),
            "aborted": self._aborted,
        }

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every ``/render`` received, in arrival order; same as ``GET /requests``."""
        return [dict(record) for record in self._records]

    # -- connection handling -----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = Conn(reader, writer)
        self._connections[task] = conn
        try:
            while True:
                try:
                    request = await conn.read_request()
                except BadRequest as exc:
                    writer.write(encode_response(error(exc.status, exc.message), keep_alive=False))
                    await writer.drain()
                    break
                if request is None:
                    break
                if not await self._dispatch(conn, request):
                    break
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            conn.close_pending()
            self._connections.pop(task, None)
            writer.close()

    async def _send(self, conn: Conn, request: Request, response: Response) -> bool:
        keep_alive = request.keep_alive and not conn.eof
        head = request.method == "HEAD"
        conn.writer.write(encode_response(response, keep_alive=keep_alive, head=head))
        await conn.writer.drain()
        return keep_alive

    async def _dispatch(self, conn: Conn, request: Request) -> bool:
        path, method = request.path, request.method
        if path == "/render":
            if method != "POST":
                return await self._send(conn, request, method_not_allowed("POST"))
            return await self._render(conn, request)
        if path.startswith("/videos/") and len(path) > len("/videos/"):
            if method not in ("GET", "HEAD"):
                return await self._send(conn, request, method_not_allowed("GET, HEAD"))
            name = unquote(path[len("/videos/") :])
            response = video_response(name, request.headers.get("range"))
            return await self._send(conn, request, response)
        if path in ("/health", "/stats", "/requests"):
            if method not in ("GET", "HEAD"):
                return await self._send(conn, request, method_not_allowed("GET, HEAD"))
            if path == "/health":
                status = self._health_status
                response = json_response(status, {"ok": 200 <= status < 300})
            elif path == "/stats":
                response = json_response(200, self.stats())
            else:
                response = json_response(200, self._records)
            return await self._send(conn, request, response)
        if path in ("/reset", "/control"):
            if method != "POST":
                return await self._send(conn, request, method_not_allowed("POST"))
            if path == "/reset":
                self.reset()
                return await self._send(conn, request, json_response(200, {"ok": True}))
            return await self._send(conn, request, self._control(request.body))
        return await self._send(conn, request, error(404, f"no such path {path!r}"))

    def _control(self, body: bytes) -> Response:
        try:
            payload = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError):
            return error(400, "body is not valid JSON")
        if not isinstance(payload, dict):
            return error(400, "body must be a JSON object")
        try:
            self.configure(**payload)
        except ValueError as exc:
            return error(400, str(exc))
        logger.info("orchestrator double settings changed: %s", payload)
        return json_response(200, self.settings)

    # -- /render -----------------------------------------------------------------------------

    def _choose(self, job_key: str, text: str) -> tuple[str, float | None]:
        markers = parse_markers(text) if "[[" in text else Markers()
        attempt = self._attempts.get(job_key, 0) + 1
        self._attempts[job_key] = attempt
        if markers.fail_first is not None and markers.fail_first_wins:
            count, failure = markers.fail_first
            return (failure if attempt <= count else "ok"), markers.latency_ms
        if markers.outcome is not None:
            return markers.outcome, markers.latency_ms
        if len(self._mix_outcomes) == 1:
            return self._mix_outcomes[0], markers.latency_ms
        outcome = self._rng.choices(self._mix_outcomes, cum_weights=self._mix_cum_weights)[0]
        return outcome, markers.latency_ms

    async def _render(self, conn: Conn, request: Request) -> bool:
        started = time.monotonic()
        received_at = time.time()
        try:
            payload = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            return await self._send(conn, request, error(400, "body is not valid JSON"))
        if not isinstance(payload, dict) or payload.get("job_id") is None:
            response = error(400, "body must be a JSON object with a job_id")
            return await self._send(conn, request, response)
        job_id = payload["job_id"]
        job_key = job_id if isinstance(job_id, str) else json.dumps(job_id)
        raw_type = payload.get("job_type")
        job_type = as_text(raw_type)
        raw_input = payload.get("input")
        text = raw_input if isinstance(raw_input, str) else as_text(raw_input)

        outcome, latency_override = self._choose(job_key, text)
        record: dict[str, Any] = {
            "job_id": job_id,
            "job_type": raw_type,
            "input": raw_input,
            "style": payload.get("style"),
            "length": payload.get("length"),
            "voice": payload.get("voice"),
            "received_at": received_at,
            "answered_at": None,
            "outcome": outcome,
            "aborted": False,
        }
        self._records.append(record)
        self._received += 1
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        by_type = self._in_flight_by_type.get(job_type, 0) + 1
        self._in_flight_by_type[job_type] = by_type
        self._max_in_flight_by_type[job_type] = max(self._max_in_flight_by_type.get(job_type, 0), by_type)
        records = self._records  # a reset() meanwhile must not touch the new counters
        in_flight = True

        def finish() -> None:
            nonlocal in_flight
            if in_flight and records is self._records:
                self._in_flight -= 1
                self._in_flight_by_type[job_type] = self._in_flight_by_type.get(job_type, 1) - 1
            in_flight = False

        try:
            if latency_override is not None:
                delay_ms = latency_override
            else:
                delay_ms = self._latency_ms
                if self._jitter_ms > 0:
                    delay_ms += self._jitter_rng.uniform(0.0, self._jitter_ms)
            if outcome == "hang":
                aborted = await conn.wait_for_eof(None)
            elif delay_ms > 0:
                aborted = await conn.wait_for_eof(delay_ms / 1000.0)
            else:
                aborted = conn.eof
            elapsed_ms = round((time.monotonic() - started) * 1000.0)
            if aborted:
                finish()
                record["aborted"] = True
                if records is self._records:
                    self._aborted += 1
                logger.info(
                    "render job_id=%s outcome=%s aborted by the client after %d ms",
                    job_id,
                    outcome,
                    elapsed_ms,
                )
                return False
            record["answered_at"] = time.time()
            finish()
            if outcome == "reset":
                logger.info("render job_id=%s outcome=reset ms=%d", job_id, elapsed_ms)
                sock = conn.writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        linger = struct.pack("ii", 1, 0)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                conn.writer.transport.abort()
                return False
            response = self._render_response(outcome, job_id, payload.get("length"), elapsed_ms)
            logger.info("render job_id=%s outcome=%s ms=%d", job_id, outcome, elapsed_ms)
            return await self._send(conn, request, response)
        finally:
            finish()

    def _render_response(self, outcome: str, job_id: Any, length: Any, elapsed_ms: int) -> Response:
        if outcome == "ok":
            name = quote(str(job_id), safe="")
            # where the video "is": this double by default, or video_base (a dead link, say)
            base = (self._video_base or self.url).rstrip("/")
            if isinstance(length, int | float) and not isinstance(length, bool) and length > 0:
                duration = float(length)
            else:
                duration = 42.0
            return json_response(
                200,
                {
                    "video_url": f"{base}/videos/{name}.mp4",
                    "thumbnail_url": f"{base}/videos/{name}.jpg",
                    "duration": duration,
                    "processing_time_ms": elapsed_ms,
                },
            )
        if outcome == "malformed":
            return json_response(200, {"video": 1})
        if outcome == "garbage":
            return Response(200, b"<html>oops", "text/html")
        code = int(outcome.split(":", 1)[1])
        headers: list[tuple[str, str]] = []
        if code in _RETRY_AFTER_STATUSES:
            headers.append(("Retry-After", format_seconds(self._retry_after_s)))
        body = {
            "error": f"simulated {code} {reason(code)} from the orchestrator double",
            "status": code,
            "job_id": job_id,
        }
        return json_response(code, body, headers)
