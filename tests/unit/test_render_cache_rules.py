"""The render cache's pure parts and how one attempt uses it (a fake cache, a fake render)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from reactor.core.circuit import CircuitBreaker
from reactor.core.errors import RenderError
from reactor.core.models import CacheDecision, ClaimedJob, RenderRequest, RenderResult
from reactor.core.policy import build_request, cache_key, wants_cache
from reactor.engine.attempt import PARKED, attempt
from reactor.engine.circuit_watch import CircuitWatch
from reactor.engine.decisions import DispatchSettings
from tests.unit.test_policy import claimed

pytestmark = pytest.mark.anyio


def topic(payload: dict[str, Any]) -> ClaimedJob:
    return claimed("topic_short", payload, field="topic")


def test_equal_requests_share_a_key_and_only_they_do() -> None:
    a = build_request(topic({"topic": "Osmosis"}))
    b = build_request(topic({"topic": " Osmosis ", "style": "default", "other": 1}))
    assert cache_key(a) == cache_key(b) and len(cache_key(a)) == 64
    for changed in ({"topic": "Osmosis", "voice": "asha"}, {"topic": "osmosis"},
                    {"topic": "Osmosis", "length": "long"}):
        assert cache_key(build_request(topic(changed))) != cache_key(a)
    # the job type is part of the request
    assert cache_key(build_request(claimed("daily_ca", {"date": "Osmosis"}, field="date"))) != cache_key(a)
    # no separator trick: the fields are a JSON array
    assert cache_key(build_request(topic({"topic": "a", "style": "b,c"}))) != cache_key(
        build_request(topic({"topic": "a,b", "style": "c"})))


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


async def run(decision: CacheDecision | Exception, payload: dict[str, Any] | None = None) -> tuple[Any, Farm]:
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
    job = topic(payload or {"topic": "Osmosis"})
    outcome = await attempt(job, farm.render, DispatchSettings(), circuit, watch, random.Random(1), cache)
    return outcome, farm


async def test_a_hit_completes_without_a_render_call() -> None:
    cached = {"video_url": "https://cdn.example/old.mp4", "thumbnail_url": None, "cached_from": "j0"}
    outcome, farm = await run(CacheDecision("hit", None, cached))
    assert (outcome.status, outcome.result, outcome.cache_key, farm.calls) == ("completed", cached, None, 0)


async def test_a_waiter_is_parked_and_a_renderer_carries_its_key() -> None:
    outcome, farm = await run(CacheDecision("wait"))
    assert (outcome.status, farm.calls) == (PARKED, 0)
    outcome, farm = await run(CacheDecision("render"))
    assert (outcome.status, farm.calls) == ("completed", 1)
    assert outcome.cache_key == cache_key(build_request(topic({"topic": "Osmosis"})))


async def test_a_broken_cache_or_an_opt_out_renders_without_a_key() -> None:
    outcome, farm = await run(RenderError("UNKNOWN", "the database is away"))
    assert (outcome.status, outcome.cache_key, farm.calls) == ("completed", None, 1)
    outcome, farm = await run(CacheDecision("hit"), {"topic": "Osmosis", "cache": False})
    assert (outcome.status, outcome.cache_key, farm.calls) == ("completed", None, 1)
