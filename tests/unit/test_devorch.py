"""The orchestrator double, driven over real HTTP (httpx) and raw sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import reactor
from reactor.testing.orchestrator import OrchestratorDouble, parse_mix

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(reactor.__file__).resolve().parent.parent
WAIT_S = 30.0  # generous upper bound for anything we poll for (slow shared CI machines)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _body(job_id: str, input_text: str = "a short explainer", job_type: str = "explainer") -> dict[str, Any]:
    return {
        "job_id": job_id,
        "job_type": job_type,
        "input": input_text,
        "style": "whiteboard",
        "length": 30,
        "voice": "alloy",
    }


async def _render(
    client: httpx.AsyncClient,
    job_id: str,
    input_text: str = "a short explainer",
    job_type: str = "explainer",
) -> httpx.Response:
    return await client.post("/render", json=_body(job_id, input_text, job_type))


async def _wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


def _client(orch: OrchestratorDouble, timeout: float = WAIT_S) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=orch.url, timeout=timeout)


# -- success and videos ------------------------------------------------------------------------


async def test_render_success_and_video_is_reachable() -> None:
    async with OrchestratorDouble() as orch, _client(orch) as client:
        assert orch.url == f"http://127.0.0.1:{orch.port}"
        response = await _render(client, "job-1")
        assert response.status_code == 200
        data = response.json()
        assert set(data) == {"video_url", "thumbnail_url", "duration", "processing_time_ms"}
        assert data["video_url"] == f"{orch.url}/videos/job-1.mp4"
        assert data["thumbnail_url"] == f"{orch.url}/videos/job-1.jpg"
        assert isinstance(data["duration"], float)
        assert data["duration"] > 0
        assert isinstance(data["processing_time_ms"], int)
        assert data["processing_time_ms"] >= 0

        video = await client.get(data["video_url"])
        assert video.status_code == 200
        assert video.headers["content-type"] == "video/mp4"
        assert len(video.content) > 4
        size = len(video.content)

        head = await client.head(data["video_url"])
        assert head.status_code == 200
        assert head.headers["content-type"] == "video/mp4"
        assert int(head.headers["content-length"]) == size
        assert head.content == b""

        partial = await client.get(data["video_url"], headers={"Range": "bytes=0-3"})
        assert partial.status_code == 206
        assert partial.headers["content-range"] == f"bytes 0-3/{size}"
        assert partial.content == video.content[:4]

        thumb = await client.get(data["thumbnail_url"])
        assert thumb.status_code == 200
        assert thumb.headers["content-type"] == "image/jpeg"
        assert thumb.content.startswith(b"\xff\xd8")

        record = orch.requests[0]
        assert record["outcome"] == "ok"
        assert record["answered_at"] is not None
        assert record["aborted"] is False
        assert orch.stats()["in_flight"] == 0


async def test_latency_is_at_least_the_configured_latency() -> None:
    async with OrchestratorDouble(latency_ms=150) as orch, _client(orch) as client:
        started = time.monotonic()
        response = await _render(client, "slow")
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert elapsed >= 0.149
        assert response.json()["processing_time_ms"] >= 150


async def test_health_unknown_paths_and_bad_bodies() -> None:
    async with OrchestratorDouble() as orch, _client(orch) as client:
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"ok": True}

        assert (await client.get("/nope")).status_code == 404
        assert (await client.get("/videos/")).status_code == 404
        not_allowed = await client.get("/render")
        assert not_allowed.status_code == 405
        assert not_allowed.headers["allow"] == "POST"

        not_json = await client.post("/render", content=b"{not json")
        assert not_json.status_code == 400
        assert "error" in not_json.json()
        no_job_id = await client.post("/render", json={"job_type": "explainer", "input": "x"})
        assert no_job_id.status_code == 400
        assert "job_id" in no_job_id.json()["error"]
        assert orch.stats()["received"] == 0


# -- outcomes chosen by markers ----------------------------------------------------------------


@pytest.mark.parametrize("code", [400, 404, 422, 500, 502])
async def test_status_marker(code: int) -> None:
    async with OrchestratorDouble() as orch, _client(orch) as client:
        response = await _render(client, f"job-{code}", f"make a video [[status={code}]] please")
        assert response.status_code == code
        assert response.json()["status"] == code
        assert "retry-after" not in response.headers
        assert orch.requests[0]["outcome"] == f"status:{code}"
        assert orch.stats()["outcomes"] == {f"status:{code}": 1}


async def test_503_and_429_carry_retry_after() -> None:
    async with OrchestratorDouble() as orch, _client(orch) as client:
        response = await _render(client, "busy", "[[status=503]]")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"

        orch.configure(retry_after_s=2.5)
        response = await _render(client, "limited", "[[status=429]]")
        assert response.status_code == 429
        assert response.headers["retry-after"] == "2.5"


async def test_malformed_and_garbage_markers() -> None:
    async with OrchestratorDouble() as orch, _client(orch) as client:
        malformed = await _render(client, "m", "[[malformed]]")
        assert malformed.status_code == 200
        assert "video_url" not in malformed.json()

        garbage = await _render(client, "g", "[[garbage]]")
        assert garbage.status_code == 200
        with pytest.raises(ValueError):
            json.loads(garbage.content)

        assert orch.stats()["outcomes"] == {"malformed": 1, "garbage": 1}


async def test_reset_marker_breaks_the_connection() -> None:
    async with OrchestratorDouble() as orch, _client(orch) as client:
        with pytest.raises(httpx.TransportError):
            await _render(client, "r", "[[reset]]")
        await _wait_until(lambda: orch.stats()["in_flight"] == 0, "in_flight == 0")
        assert orch.requests[0]["outcome"] == "reset"
        assert orch.requests[0]["aborted"] is False
        # The double keeps serving afterwards.
        assert (await _render(client, "after")).status_code == 200


async def test_hang_until_client_timeout_marks_the_record_aborted() -> None:
    async with OrchestratorDouble() as orch:
        async with _client(orch, timeout=0.5) as client:
            with pytest.raises(httpx.TimeoutException):
                await _render(client, "stuck", "[[hang]]")
        await _wait_until(lambda: orch.stats()["aborted"] == 1, "aborted == 1")
        stats = orch.stats()
        assert stats["in_flight"] == 0
        assert stats["outcomes"] == {"hang": 1}
        record = orch.requests[0]
        assert record["aborted"] is True
        assert record["answered_at"] is None


async def test_latency_marker_combines_with_an_outcome() -> None:
    async with OrchestratorDouble() as orch, _client(orch) as client:
        started = time.monotonic()
        response = await _render(client, "lat", "[[latency=150]] [[status=500]]")
        assert response.status_code == 500
        assert time.monotonic() - started >= 0.149


async def test_fail_first_then_success() -> None:
    async with OrchestratorDouble(retry_after_s=0) as orch, _client(orch) as client:
        text = "retry me [[fail_first=2:status=503]]"
        codes = [(await _render(client, "flaky", text)).status_code for _ in range(4)]
        assert codes == [503, 503, 200, 200]
        # Counted per job_id.
        assert (await _render(client, "other", text)).status_code == 503
        assert [r["outcome"] for r in orch.requests] == [
            "status:503",
            "status:503",
            "ok",
            "ok",
            "status:503",
        ]


async def test_marker_beats_the_mix() -> None:
    async with OrchestratorDouble(mix={"status:500": 1}) as orch, _client(orch) as client:
        assert (await _render(client, "a")).status_code == 500
        assert (await _render(client, "b", "[[ok]]")).status_code == 200
        assert (await _render(client, "c", "[[garbage]]")).status_code == 200


# -- the global mix ------------------------------------------------------------------------------


async def _statuses_with_mix(seed: int, n: int) -> tuple[list[int], dict[str, Any]]:
    mix = {"ok": 50, "status:500": 30, "status=502": 20}
    async with OrchestratorDouble(mix=mix, seed=seed) as orch, _client(orch) as client:
        statuses = [(await _render(client, f"job-{i}")).status_code for i in range(n)]
        return statuses, orch.stats()


async def test_mix_with_seed_is_reproducible() -> None:
    first, stats = await _statuses_with_mix(seed=7, n=40)
    second, _ = await _statuses_with_mix(seed=7, n=40)
    assert first == second
    assert set(first) == {200, 500, 502}
    assert stats["received"] == 40
    assert sum(stats["outcomes"].values()) == 40
    assert set(stats["outcomes"]) == {"ok", "status:500", "status:502"}


def test_parse_mix() -> None:
    assert parse_mix("ok=90,status:500=5,hang=5") == {"ok": 90.0, "status:500": 5.0, "hang": 5.0}
    assert parse_mix("status=503=1") == {"status:503": 1.0}
    for bad in ("ok", "nope=1", "ok=x", "status:200=1", "ok=0"):
        with pytest.raises(ValueError):
            parse_mix(bad)


# -- concurrency counters ----------------------------------------------------------------------


async def test_max_in_flight_with_concurrent_requests() -> None:
    async with OrchestratorDouble(latency_ms=200) as orch, _client(orch) as client:
        responses: list[httpx.Response] = []

        async def one(i: int) -> None:
            responses.append(await _render(client, f"job-{i}"))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
        assert [r.status_code for r in responses] == [200] * 5
        assert all(r.json()["processing_time_ms"] >= 200 for r in responses)
        stats = orch.stats()
        assert stats["max_in_flight"] == 5
        assert stats["in_flight"] == 0
        assert stats["received"] == 5


async def test_max_in_flight_by_type_and_aborted_on_disconnect() -> None:
    async with OrchestratorDouble() as orch:
        async with _client(orch) as client, anyio.create_task_group() as tg:
            for i, job_type in enumerate(["explainer", "explainer", "explainer", "teaser", "teaser"]):
                tg.start_soon(_render, client, f"job-{i}", "[[hang]]", job_type)
            await _wait_until(lambda: orch.stats()["in_flight"] == 5, "5 renders in flight")
            tg.cancel_scope.cancel()  # the client gives up: its connections are closed
        await _wait_until(lambda: orch.stats()["aborted"] == 5, "5 aborted renders")
        stats = orch.stats()
        assert stats["max_in_flight"] == 5
        assert stats["max_in_flight_by_type"] == {"explainer": 3, "teaser": 2}
        assert stats["in_flight"] == 0
        assert all(r["aborted"] and r["answered_at"] is None for r in orch.requests)


# -- records, /control, /reset -----------------------------------------------------------------


async def test_requests_are_recorded_in_arrival_order() -> None:
    async with OrchestratorDouble() as orch, _client(orch) as client:
        for i in range(3):
            await _render(client, f"job-{i}", f"input {i}", job_type="explainer")
        listed = (await client.get("/requests")).json()
        assert listed == orch.requests
        assert [r["job_id"] for r in listed] == ["job-0", "job-1", "job-2"]
        expected_keys = {
            "job_id",
            "job_type",
            "input",
            "style",
            "length",
            "voice",
            "received_at",
            "answered_at",
            "outcome",
            "aborted",
        }
        for i, record in enumerate(listed):
            assert set(record) == expected_keys
            assert record["input"] == f"input {i}"
            assert record["style"] == "whiteboard"
            assert record["voice"] == "alloy"
            assert record["length"] == 30
            assert record["answered_at"] >= record["received_at"]
        assert (await client.get("/stats")).json() == orch.stats()


async def test_control_endpoint() -> None:
    async with OrchestratorDouble() as orch, _client(orch) as client:
        changed = await client.post(
            "/control",
            json={"latency_ms": 10, "mix": {"status:500": 1}, "health_status": 503, "seed": 3},
        )
        assert changed.status_code == 200
        settings = changed.json()
        assert settings["latency_ms"] == 10
        assert settings["mix"] == {"status:500": 1}
        assert settings["health_status"] == 503
        assert settings["seed"] == 3
        assert settings["jitter_ms"] == 0
        assert settings["retry_after_s"] == 1

        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json() == {"ok": False}
        assert (await _render(client, "x")).status_code == 500

        for bad in ({"nope": 1}, {"mix": {"explode": 1}}, {"latency_ms": -1}, [1]):
            response = await client.post("/control", json=bad)
            assert response.status_code == 400, bad
        assert orch.settings == settings  # nothing changed by the rejected calls

        with pytest.raises(ValueError):
            orch.configure(health_status="bad")
        orch.configure(mix={"ok": 1}, health_status=200)
        assert (await client.get("/health")).status_code == 200
        assert (await _render(client, "y")).status_code == 200


async def test_reset_clears_records_but_keeps_settings() -> None:
    async with OrchestratorDouble(mix={"status:502": 1}) as orch, _client(orch) as client:
        await _render(client, "a")
        await _render(client, "b", "[[fail_first=1:status=503]]")
        assert orch.stats()["received"] == 2
        assert (await client.post("/reset")).status_code == 200
        assert orch.requests == []
        assert orch.stats() == {
            "received": 0,
            "in_flight": 0,
            "max_in_flight": 0,
            "max_in_flight_by_type": {},
            "outcomes": {},
            "aborted": 0,
        }
        assert (await _render(client, "c")).status_code == 502  # the mix is kept
        # fail_first counts start again.
        assert (await _render(client, "b", "[[fail_first=1:status=503]]")).status_code == 503
        orch.reset()
        assert orch.requests == []


# -- lifecycle ---------------------------------------------------------------------------------


async def test_stop_then_restart_on_the_same_port() -> None:
    orch = OrchestratorDouble()
    url = await orch.start()
    port = orch.port
    try:
        async with _client(orch) as client:
            assert (await _render(client, "before")).status_code == 200

            hang_errors: list[BaseException] = []

            async def hanging() -> None:
                try:
                    await _render(client, "in-flight", "[[hang]]")
                except httpx.TransportError as exc:
                    hang_errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(hanging)
                await _wait_until(lambda: orch.stats()["in_flight"] == 1, "a render in flight")
                await orch.stop()
            assert len(hang_errors) == 1  # the in-flight render was dropped

        async with _client(orch) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/health")

        assert await orch.start(port=port) == url
        async with _client(orch) as client:
            assert (await _render(client, "after")).status_code == 200
        assert [r["job_id"] for r in orch.requests] == ["before", "in-flight", "after"]
    finally:
        await orch.stop()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ")[1]), headers, body


async def test_keep_alive_pipelining_and_connection_close_over_a_raw_socket() -> None:
    async with OrchestratorDouble() as orch:
        reader, writer = await asyncio.open_connection("127.0.0.1", orch.port)
        try:
            body = json.dumps(_body("raw")).encode()
            render = (
                b"POST /render HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + render)
            with anyio.fail_after(WAIT_S):
                status, headers, _ = await _read_response(reader)
                assert (status, headers["connection"]) == (200, "keep-alive")
                status, _, payload = await _read_response(reader)
                assert status == 200
                assert json.loads(payload)["video_url"].endswith("/videos/raw.mp4")

                writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status, headers, payload = await _read_response(reader)
                assert (status, headers["connection"]) == (200, "close")
                assert json.loads(payload)["received"] == 1
                assert await reader.read() == b""  # the double closed the connection
        finally:
            writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", orch.port)
        try:
            writer.write(b"POST /render HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            with anyio.fail_after(WAIT_S):
                status, _, _ = await _read_response(reader)
                assert status == 501
        finally:
            writer.close()


# -- command line ------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_module_entry_point_serves_until_sigterm() -> None:
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    command = [sys.executable, "-m", "reactor.testing.serve", "--port", "0", "--latency-ms", "1"]
    async with await anyio.open_process(command, env=env) as process:
        assert process.stdout is not None
        try:
            line = b""
            with anyio.fail_after(WAIT_S):
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive(1)
            text = line.decode().strip()
            prefix = "orchestrator double listening on "
            assert text.startswith(prefix)
            url = text[len(prefix) :]
            async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
                assert (await client.post("/render", json=_body("cli"))).status_code == 200
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(WAIT_S):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
