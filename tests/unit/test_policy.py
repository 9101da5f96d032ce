from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest

from reactor.core.models import ClaimedJob
from reactor.core.policy import (
    InvalidPayload,
    backoff_seconds,
    build_request,
    category_for_status,
    decide_failure,
    parse_retry_after,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def claimed(job_type: str = "doubt", payload: dict[str, Any] | None = None, *, field: str = "question",
            defaults: dict[str, Any] | None = None) -> ClaimedJob:
    return ClaimedJob(
        id=uuid4(), job_type=job_type, priority="medium", payload=payload or {}, user_id=None,
        renderer="manim", retry_count=0, max_retries=3, attempt=1, created_at=NOW, input_field=field,
        type_defaults=defaults or {}, timeout_minutes=10,
    )


def test_request_takes_input_from_the_type_field_and_documented_defaults() -> None:
    req = build_request(claimed(payload={"question": "  why?  "}))
    assert (req.input, req.style, req.length, req.voice) == ("why?", "default", "short", "default")


def test_payload_then_type_defaults_then_global_defaults() -> None:
    job = claimed("topic_short", {"topic": "Tides", "voice": "asha"}, field="topic",
                  defaults={"style": "chalkboard", "voice": "ravi"})
    req = build_request(job)
    assert (req.input, req.style, req.length, req.voice) == ("Tides", "chalkboard", "short", "asha")


def test_numbers_are_accepted_as_input() -> None:
    assert build_request(claimed("daily_ca", {"date": 20261122}, field="date")).input == "20261122"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "payload.question is required for job type doubt"),
        ({"question": "   "}, "payload.question is required"),
        ({"question": ["a"]}, "payload.question must be text"),
        ({"question": True}, "payload.question must be text"),
        ({"question": "x" * 4001}, "at most 4000"),
        ({"question": "ok", "style": 3}, "payload.style must be non-empty text"),
        ({"question": "ok", "voice": "v" * 65}, "payload.voice is longer than 64"),
    ],
)
def test_bad_payloads_are_invalid_input(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidPayload, match=message.replace(".", r"\.")):
        build_request(claimed(payload=payload))


@pytest.mark.parametrize(
    ("status", "category"),
    [(400, "INVALID_INPUT"), (422, "INVALID_INPUT"), (404, "NOT_FOUND"), (500, "API_ERROR"),
     (502, "API_ERROR"), (503, "API_ERROR"), (429, "API_ERROR"), (401, "UNKNOWN"), (418, "UNKNOWN"),
     (501, "UNKNOWN")],
)
def test_status_categories(status: int, category: str) -> None:
    assert category_for_status(status) == category


def test_retry_after_forms() -> None:
    assert parse_retry_after("7", NOW) == 7.0
    assert parse_retry_after("Sun, 22 Nov 2026 12:00:30 GMT", NOW) == 30.0
    assert parse_retry_after("Sun, 22 Nov 2026 11:00:00 GMT", NOW) == 0.0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("999999", NOW) == 3600.0


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    for n in range(12):
        d = backoff_seconds(n, rng, base=2.0, cap=300.0)
        ceiling = min(300.0, 2.0 * 2**n)
        assert ceiling / 2 <= d <= ceiling
    delays = {round(backoff_seconds(3, rng), 6) for _ in range(20)}
    assert len(delays) > 1  # jittered


def test_retry_after_is_a_lower_bound() -> None:
    assert backoff_seconds(0, random.Random(0), base=1.0, retry_after=42.0) == 42.0


@pytest.mark.parametrize("category", ["TIMEOUT", "API_ERROR", "UNKNOWN"])
def test_retryable_failures_go_back_to_the_queue_until_retries_are_spent(category: str) -> None:
    rng = random.Random(0)
    d = decide_failure(category, 0, 3, rng)
    assert (d.status, d.retry_count) == ("queued", 1) and d.delay_seconds > 0
    d = decide_failure(category, 3, 3, rng)
    assert (d.status, d.retry_count) == ("failed", 3)


@pytest.mark.parametrize("category", ["INVALID_INPUT", "NOT_FOUND"])
def test_job_errors_are_not_retried(category: str) -> None:
    d = decide_failure(category, 0, 3, random.Random(0))
    assert (d.status, d.retry_count, d.delay_seconds) == ("failed", 0, 0.0)
