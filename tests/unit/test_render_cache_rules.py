"""How one attempt uses the render cache (a fake cache, a fake render): the claim keyed the job and
said what the cache holds (tests/integration/test_render_cache.py runs the SQL side)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from reactor.core.circuit import CircuitBreaker
from reactor.core.errors import RenderError
from reactor.core.models import CacheDecision, ClaimedJob, RenderRequest, RenderResult
from reactor.core.policy import wants_cache
from reactor.engine.attempt import PARKED, attempt
from reactor.engine.circuit_watch import CircuitWatch
from reactor.engine.decisions import DispatchSettings
from tests.unit.test_policy import claimed

pytestmark = pytest.mark.anyio


def topic(payload: dict[str, Any]) -> ClaimedJob:
    return claimed("topic_short", payload, field="topic")


def test_a_job_opts_out_with_cache_false_only() -> None:
    assert wants_cache(topic({"topic": "x"}))
    assert wants_cache(topic({"topic": "x", "cache": "false"}))
    assert not wants_cache(topic({"topic": "x", "cache": False}))


class Farm:
    def __init__(self) -> None:
        self.calls = 0

    async def render(self, request: RenderRequest, timeout: float) -> RenderResult:
        self.calls += 1
        return RenderResult.model_validate({"video_url": "https://cdn.example/v.mp4", "duration": 1.0,
                                            "processing_time_ms": 5})


KEY = "k" * 64


async def run(decision: CacheDecision | Exception, payload: dict[str, Any] | None = None,
              state: str | None = "ask", key: str | None = KEY) -> tuple[Any, Farm, list[str]]:
    farm = Farm()
    asked: list[str] = []

    async def cache(job: ClaimedJob, request: RenderRequest, key: str, wait_s: float) -> CacheDecision:
        asked.append(key)
        assert wait_s > 0
        if isinstance(decision, Exception):
            raise decision
        return decision

    circuit = CircuitBreaker(threshold=5, probe_base_s=1.0, probe_cap_s=30.0, rng=random.Random(1))
    watch = CircuitWatch(circuit, None, None, inflight=lambda: 0, want_claim=lambda: None)  # type: ignore[arg-type]
    job = dataclasses.replace(topic(payload or {"topic": "Osmosis"}), cache_key=key, cache_state=state)
    outcome = await attempt(job, farm.render, DispatchSettings(), circuit, watch, random.Random(1), cache)
    return outcome, farm, asked


async def test_a_hit_completes_without_a_render_call() -> None:
    cached = {"video_url": "https://cdn.example/old.mp4", "thumbnail_url": None, "cached_from": "j0"}
    for state in ("hit", "ask"):
        outcome, farm, asked = await run(CacheDecision("hit", None, cached), state=state)
        assert (outcome.status, outcome.result, outcome.cache_key, farm.calls, asked) == (
            "completed", cached, None, 0, [KEY])


async def test_a_waiter_is_parked_and_a_renderer_carries_its_key() -> None:
    outcome, farm, _ = await run(CacheDecision("wait"), state="wait")
    assert (outcome.status, farm.calls) == (PARKED, 0)
    outcome, farm, asked = await run(CacheDecision("render"))
    assert (outcome.status, farm.calls, outcome.cache_key, asked) == ("completed", 1, KEY, [KEY])


async def test_a_job_the_claim_said_renders_asks_nothing_more() -> None:
    # the claim found nothing to share and named this job in the entry: no round trip before the render
    outcome, farm, asked = await run(RuntimeError("must not be asked"), state="render")
    assert (outcome.status, farm.calls, outcome.cache_key, asked) == ("completed", 1, KEY, [])


async def test_a_broken_cache_an_opt_out_or_no_key_renders_without_a_key() -> None:
    outcome, farm, _ = await run(RenderError("UNKNOWN", "the database is away"))
    assert (outcome.status, outcome.cache_key, farm.calls) == ("completed", None, 1)
    outcome, farm, asked = await run(CacheDecision("hit"), {"topic": "Osmosis", "cache": False})
    assert (outcome.status, outcome.cache_key, farm.calls, asked) == ("completed", None, 1, [])
    outcome, farm, asked = await run(CacheDecision("hit"), key=None, state=None)
    assert (outcome.status, outcome.cache_key, farm.calls, asked) == ("completed", None, 1, [])
