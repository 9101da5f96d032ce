"""The render client against real sockets: the orchestrator double, and small servers that answer
in the ways a real HTTP server may (chunked, close-delimited, closing idle connections)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from reactor.core.errors import RenderError
from reactor.core.models import RenderRequest
from reactor.render.client import MAX_ANSWER_BYTES, RenderClient
from reactor.testing.orchestrator import OrchestratorDouble

pytestmark = pytest.mark.anyio

RESULT = {"video_url": "https://cdn/v.mp4", "thumbnail_url": "https://cdn/v.jpg", "duration": 30.0,
          "processing_time_ms": 5}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _request(text: str = "what is a prime") -> RenderRequest:
    return RenderRequest(uuid.uuid4(), "doubt", text, "whiteboard", "short", "alloy")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n")
                  if line.lower().startswith("content-length"))
    return head, await reader.readexactly(length)


async def test_it_posts_the_request_and_reuses_the_connection() -> None:
    async with OrchestratorDouble() as orch:
        client = RenderClient(orch.url)
        try:
            first = await client.render(_request(), 5)
            await client.render(_request(), 5)
        finally:
            await client.aclose()
        assert str(first.video_url).endswith(".mp4")
        assert [r["input"] for r in orch.requests] == ["what is a prime"] * 2
    assert len(client._idle) == 0  # closed by aclose


async def test_a_path_prefix_chunked_answers_and_one_connection_for_all() -> None:
    connections = 0
    seen: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head, body = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            seen.append(head)
            assert json.loads(body)["input"] == "what is a prime"
            payload = json.dumps(RESULT).encode()
            half = len(payload) // 2
            chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, payload[:half], len(payload) - half, payload[half:])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunks)
            await writer.drain()
        writer.close()

    async with _server(handler) as url:
        client = RenderClient(url.replace("http://", "http://render%40farm:s%3Acret@"))
        try:
            for _ in range(3):
                assert (await client.render(_request(), 5)).duration == 30.0
        finally:
            await client.aclose()
    assert [h.split("\r\n", 1)[0] for h in seen] == ["POST /api/render HTTP/1.1"] * 3
    # credentials in the URL: Basic authorization, and not in the Host header
    assert "\r\nAuthorization: Basic cmVuZGVyQGZhcm06czpjcmV0\r\n" in seen[0]
    assert f"\r\nHost: {url.split('//')[1].split('/')[0]}\r\n" in seen[0]
    assert connections == 1


async def test_an_answer_ended_by_closing_and_a_server_that_drops_idle_connections() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        # no Content-Length, no chunks: the body ends when the connection does (HTTP/1.0 style)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + json.dumps(RESULT).encode())
        await writer.drain()
        writer.close()

    async with _server(handler) as url:
        client = RenderClient(url)
        try:
            for _ in range(3):
                assert str((await client.render(_request(), 5)).video_url) == RESULT["video_url"]
                await anyio.sleep(0.05)  # the closed connection is noticed, never reused
        finally:
            await client.aclose()
    assert connections == 3


async def test_an_interim_answer_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        body = json.dumps(RESULT).encode()
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await reader.read()  # until the client goes
        writer.close()

    async with _server(handler) as url:
        client = RenderClient(url)
        try:
            assert (await client.render(_request(), 5)).processing_time_ms == 5
        finally:
            await client.aclose()


async def test_an_answer_cut_off_is_a_transport_failure_and_an_oversized_one_unknown() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"video")
        await writer.drain()
        writer.close()

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_ANSWER_BYTES + 10))
        try:
            for _ in range(MAX_ANSWER_BYTES // 65536 + 2):
                writer.write(b"x" * 65536)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        writer.close()

    async with _server(cut) as url:
        with pytest.raises(RenderError) as err:
            await RenderClient(url).render(_request(), 5)
        assert (err.value.category, err.value.transport) == ("TIMEOUT", True)
        assert "connection reset by the orchestrator" in err.value.message
    async with _server(huge) as url:
        with pytest.raises(RenderError) as err:
            await RenderClient(url).render(_request(), 5)
        assert (err.value.category, err.value.transport) == ("UNKNOWN", False)
        assert "larger than" in err.value.message
    async with _server(not_http) as url:
        with pytest.raises(RenderError) as err:
            await RenderClient(url).render(_request(), 5)
        assert (err.value.category, err.value.transport) == ("UNKNOWN", False)


async def test_the_deadline_aborts_the_request_and_refused_connections_are_transport_failures() -> None:
    async with OrchestratorDouble(latency_ms=60_000) as orch:
        client = RenderClient(orch.url)
        with pytest.raises(RenderError) as err:
            await client.render(_request(), 0.3)
        assert err.value.category == "TIMEOUT" and not err.value.transport
        assert "deadline" in err.value.message
        with anyio.fail_after(10):
            while orch.stats()["aborted"] < 1:  # the double saw the connection go
                await anyio.sleep(0.02)
        port = orch.port
    with pytest.raises(RenderError) as err:
        await RenderClient(f"http://127.0.0.1:{port}").render(_request(), 5)
    assert (err.value.category, err.value.transport) == ("TIMEOUT", True)
    assert "cannot connect" in err.value.message
    assert not await RenderClient(f"http://127.0.0.1:{port}").health(1)


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        RenderClient("ftp://orchestrator")
