"""`reactor smoke` against a running reactor and the orchestrator double (which serves the videos)."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from reactor.ops.smoke import SmokeFailed, SmokeSettings, run_smoke
from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.reactors import running_reactor

pytestmark = pytest.mark.anyio


def steps(lines: list[str]) -> list[str]:
    """The step names of the printed lines: '[  0.012 s] ok    submit: job ...'."""
    return [ln.split(" ok ", 1)[1].split(":", 1)[0].strip() for ln in lines if " ok " in ln]


def settings(dsn: str, lines: list[str], timeout_s: float = 30.0) -> SmokeSettings:
    return SmokeSettings(dsn=dsn, timeout_s=timeout_s, poll_s=0.05, print_fn=lines.append)


async def test_smoke_passes_end_to_end(dsn: str, db: psycopg.Connection[Any]) -> None:
    lines: list[str] = []
    async with OrchestratorDouble(latency_ms=50) as orch, running_reactor(dsn, orch.url):
        summary = await anyio.to_thread.run_sync(run_smoke, settings(dsn, lines))
    assert summary["video_url"].startswith(orch.url)
    assert steps(lines) == ["submit", "queued", "completed", "result", "video reachable"]
    assert all(" ok " in ln for ln in lines)
    row = db.execute("SELECT status, payload->>'smoke' FROM jobs WHERE id = %s", (summary["job_id"],)).fetchone()
    assert row == ("completed", "true")
    # the video URL was really fetched (HEAD) from the double
    assert any(r["job_id"] == summary["job_id"] for r in orch.requests)


async def test_smoke_names_the_step_when_the_orchestrator_answers_500(dsn: str, db: psycopg.Connection[Any]) -> None:
    lines: list[str] = []
    async with OrchestratorDouble(mix={"status:500": 1}) as orch, running_reactor(dsn, orch.url):
        with pytest.raises(SmokeFailed) as info:
            await anyio.to_thread.run_sync(run_smoke, settings(dsn, lines))
    assert info.value.step == "wait for completion"
    assert "API_ERROR" in info.value.reason and "500" in info.value.reason
    assert db.execute("SELECT status FROM jobs").fetchone() == ("failed",)


async def test_smoke_names_the_step_when_the_video_url_is_404(dsn: str, db: psycopg.Connection[Any]) -> None:
    lines: list[str] = []
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url):
        orch.configure(video_base=f"{orch.url}/gone")
        with pytest.raises(SmokeFailed) as info:
            await anyio.to_thread.run_sync(run_smoke, settings(dsn, lines))
    assert info.value.step == "video reachable"
    assert "404" in info.value.reason
    assert steps(lines) == ["submit", "queued", "completed", "result"]


async def test_smoke_times_out_and_cancels_when_no_reactor_runs(dsn: str, db: psycopg.Connection[Any]) -> None:
    lines: list[str] = []
    with pytest.raises(SmokeFailed) as info:
        await anyio.to_thread.run_sync(run_smoke, settings(dsn, lines, timeout_s=1.5))
    assert info.value.step == "wait for completion"
    assert "cancelled" in info.value.reason
    assert db.execute("SELECT status FROM jobs").fetchone() == ("cancelled",)


async def test_smoke_command_exit_codes(dsn: str, db: psycopg.Connection[Any]) -> None:
    """The CLI as a real process: 0 when the job goes through, 1 naming the step when it does not."""
    import subprocess
    import sys

    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url):
        ok = await anyio.run_process(
            [sys.executable, "-m", "reactor", "smoke", "--dsn", dsn, "--timeout", "30"], check=False)
        orch.configure(mix={"status:422": 1})
        bad = await anyio.run_process(
            [sys.executable, "-m", "reactor", "smoke", "--dsn", dsn, "--timeout", "30"], check=False,
            stderr=subprocess.PIPE)
    assert ok.returncode == 0, ok.stdout.decode() + (ok.stderr or b"").decode()
    assert b"smoke test passed" in ok.stdout
    assert bad.returncode == 1
    assert b"step 'wait for completion' failed" in bad.stderr and b"INVALID_INPUT" in bad.stderr
