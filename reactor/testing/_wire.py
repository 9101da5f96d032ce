"""The orchestrator double's HTTP/1.1 on asyncio streams: requests read, responses written,
keep-alive, and the few bytes it serves as videos and thumbnails (with ``Range``)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from reactor.core.errors import ReactorError

__all__ = [
    "READ_CHUNK",
    "BadRequest",
    "Conn",
    "Request",
    "Response",
    "as_text",
    "encode_response",
    "error",
    "format_seconds",
    "json_response",
    "method_not_allowed",
    "reason",
    "video_response",
]

_MAX_HEADER_BYTES = 64 * 1024
_MAX_BODY_BYTES = 16 * 1024 * 1024
READ_CHUNK = 64 * 1024
_MP4_BYTES = (
    b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41\x00\x00\x00\x08free\x00\x00\x00\x10mdatreactor-demo"
)
_JPEG_BYTES = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
_OCTET_BYTES = b"reactor orchestrator double\n"


class BadRequest(ReactorError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, body, "application/json", headers or [])


def error(status: int, message: str) -> Response:
    return json_response(status, {"error": message, "status": status})


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def encode_response(response: Response, *, keep_alive: bool, head: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {reason(response.status)}", "Server: reactor-devorch"]
    if response.content_type is not None:
        lines.append(f"Content-Type: {response.content_type}")
    lines.append(f"Content-Length: {len(response.body)}")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return data if head else data + response.body


class Conn:
    """One client connection: a byte buffer over the stream reader, plus EOF detection."""

    __slots__ = ("_pending", "buf", "eof", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self._pending: asyncio.Task[bytes] | None = None

    async def _read_chunk(self) -> bytes:
        try:
            return await self.reader.read(READ_CHUNK)
        except (ConnectionError, OSError):
            return b""

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF."""
        if self.eof:
            return False
        if self._pending is not None:
            task, self._pending = self._pending, None
            data = await task
        else:
            data = await self._read_chunk()
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def wait_for_eof(self, wait_s: float | None) -> bool:
        """Wait up to ``wait_s`` seconds (None: forever); True if the peer closed meanwhile.

        Bytes that arrive meanwhile (a pipelined request) stay buffered for the next read.
        """
        loop = asyncio.get_running_loop()
        deadline = None if wait_s is None else loop.time() + wait_s
        while not self.eof:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            if len(self.buf) > _MAX_BODY_BYTES + _MAX_HEADER_BYTES:
                # The peer is flooding us; stop reading and just wait.
                await asyncio.sleep(remaining if remaining is not None else 3600.0)
                continue
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._read_chunk())
            done, _ = await asyncio.wait({self._pending}, timeout=remaining)
            if not done:
                return False
            task, self._pending = self._pending, None
            data = task.result()
            if not data:
                self.eof = True
            else:
                self.buf += data
        return True

    def close_pending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    async def read_request(self) -> Request | None:
        """Parse the next request; None when the peer closed between requests."""
        while True:
            while self.buf[:2] == b"\r\n":  # tolerate stray CRLFs between requests
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > _MAX_HEADER_BYTES:
                raise BadRequest(431, "request header too large")
            if not await self._fill():
                return None
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(400, f"bad request line {request_line[:100]!r}")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(400, f"bad header line {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise BadRequest(501, "chunked request bodies are not supported")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise BadRequest(400, "bad Content-Length") from None
        if length < 0 or length > _MAX_BODY_BYTES:
            raise BadRequest(413 if length > 0 else 400, "bad Content-Length")
        if length > len(self.buf) and headers.get("expect", "").lower() == "100-continue":
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(self.buf) < length:
            if not await self._fill():
                return None
        body = bytes(self.buf[:length])
        del self.buf[:length]
        connection = headers.get("connection", "").lower()
        keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
        path = target.split("?", 1)[0]
        if path.startswith(("http://", "https://")):  # absolute-form target
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        return Request(method.upper(), path, headers, body, keep_alive)


def video_response(name: str, range_header: str | None) -> Response:
    lower = name.lower()
    if lower.endswith((".jpg", ".jpeg")):
        content_type, data = "image/jpeg", _JPEG_BYTES
    elif lower.endswith(".mp4"):
        content_type, data = "video/mp4", _MP4_BYTES
    else:
        content_type, data = "application/octet-stream", _OCTET_BYTES
    headers = [("Accept-Ranges", "bytes")]
    size = len(data)
    if range_header:
        unit, _, spec = range_header.partition("=")
        first_text, dash, last_text = spec.strip().partition("-")
        if unit.strip().lower() == "bytes" and dash and "," not in spec:
            try:
                if first_text:
                    first = int(first_text)
                    last = int(last_text) if last_text else size - 1
                else:  # suffix range: the last N bytes
                    first, last = max(size - int(last_text), 0), size - 1
            except ValueError:
                first, last = -1, -1  # unparseable: ignore the header
            if first >= 0 and last >= first:
                if first >= size:
                    headers.append(("Content-Range", f"bytes */{size}"))
                    return Response(416, b"", content_type, headers)
                last = min(last, size - 1)
                headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
                return Response(206, data[first : last + 1], content_type, headers)
    return Response(200, data, content_type, headers)




def method_not_allowed(allow: str) -> Response:
    response = error(405, "method not allowed")
    response.headers.append(("Allow", allow))
    return response


def as_text(value: Any) -> str:
    """A JSON value as a string: strings as they are, null as "", others as JSON."""
    if isinstance(value, str):
        return value
    return "" if value is None else json.dumps(value)


def format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"
