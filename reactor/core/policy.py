"""Pure decisions: what to send for a job, how to read an answer, when to try again.

Nothing here does I/O or reads a clock: ``now`` and random numbers come in as arguments, so every
rule is tested without a database or a network.
"""

from __future__ import annotations

import email.utils
import math
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from reactor.core.backoff import backoff
from reactor.core.errors import ReactorError
from reactor.core.models import ClaimedJob, RenderRequest, Undecodable

__all__ = [
    "DEFAULT_RENDER_OPTIONS",
    "MAX_PAYLOAD_BYTES",
    "MAX_PAYLOAD_DEPTH",
    "RETRYABLE",
    "Decision",
    "InvalidPayload",
    "backoff_seconds",
    "build_request",
    "category_for_status",
    "decide_failure",
    "nested_deeper_than",
    "parse_retry_after",
    "wants_cache",
]

#: What a job gets when neither its payload nor its job type says otherwise.
DEFAULT_RENDER_OPTIONS: dict[str, str] = {"style": "default", "length": "short", "voice": "default"}
MAX_INPUT_CHARS = 4000
MAX_OPTION_CHARS = 64
#: the limits of a job's payload: the SQL contract refuses more at INSERT (migration 0006), and the
#: reactor fails a job claimed with more (a row written before that migration) as INVALID_INPUT
MAX_PAYLOAD_BYTES = 262_144  # as JSON text
MAX_PAYLOAD_DEPTH = 64  # containers: {} is 1 deep, {"a": []} 2

#: Error categories worth another attempt.
RETRYABLE = frozenset({"TIMEOUT", "API_ERROR", "UNKNOWN"})


class InvalidPayload(ReactorError, ValueError):
    """The job's payload cannot be turned into a render request (category INVALID_INPUT)."""


def build_request(job: ClaimedJob) -> RenderRequest:
    """The orchestrator request for a job, or :class:`InvalidPayload` saying what is wrong.

    ``input`` is ``payload[input_field]`` where the job type names the field (doubt: question,
    topic_short: topic, daily_ca: date). ``style``, ``length`` and ``voice`` come from the payload,
    else the job type's ``defaults``, else :data:`DEFAULT_RENDER_OPTIONS`.
    """
    if isinstance(job.payload, Undecodable):
        raise InvalidPayload(f"payload {job.payload.reason}")
    if not isinstance(job.payload, dict):
        raise InvalidPayload(f"payload must be a JSON object, got {type(job.payload).__name__}")
    if nested_deeper_than(job.payload, MAX_PAYLOAD_DEPTH):
        raise InvalidPayload(f"payload is nested more than {MAX_PAYLOAD_DEPTH} levels deep")
    defaults = job.type_defaults
    if isinstance(defaults, Undecodable) or not isinstance(defaults, dict):
        raise InvalidPayload(f"the defaults of job type {job.job_type} cannot be used")
    field = job.input_field
    value = job.payload.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidPayload(f"payload.{field} is required for job type {job.job_type}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidPayload(f"payload.{field} must be text, got {_json_type(value)}")
    if isinstance(value, str) and len(value) > MAX_INPUT_CHARS:
        raise InvalidPayload(f"payload.{field} is {len(value)} characters; at most {MAX_INPUT_CHARS}")
    text = str(value).strip()
    options: dict[str, str] = {}
    for key, fallback in DEFAULT_RENDER_OPTIONS.items():
        raw: Any = job.payload.get(key, defaults.get(key, fallback))
        if not isinstance(raw, str) or not raw.strip():
            raise InvalidPayload(f"payload.{key} must be non-empty text")
        if len(raw) > MAX_OPTION_CHARS:
            raise InvalidPayload(f"payload.{key} is longer than {MAX_OPTION_CHARS} characters")
        options[key] = raw.strip()
    return RenderRequest(
        job_id=job.id,
        job_type=job.job_type,
        input=text,
        style=options["style"],
        length=options["length"],
        voice=options["voice"],
    )


def wants_cache(job: ClaimedJob) -> bool:
    """Whether a job may use the render cache: not when its payload says ``"cache": false``."""
    return not (isinstance(job.payload, dict) and job.payload.get("cache") is False)


def nested_deeper_than(value: object, limit: int) -> bool:
    """Whether a decoded JSON value nests containers more than ``limit`` deep (``{}`` is 1 deep).

    Iterative, and it stops at the first container past the limit: safe on any input.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", bool: "boolean", str: "string", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def category_for_status(status_code: int) -> str:
    """Error category of a non-2xx answer from the orchestrator."""
    if status_code in (400, 422):
        return "INVALID_INPUT"
    if status_code == 404:
        return "NOT_FOUND"
    if status_code in (429, 500, 502, 503, 504):
        return "API_ERROR"
    return "UNKNOWN"


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - now).total_seconds()
    if math.isnan(seconds) or seconds < 0:
        return 0.0
    return min(seconds, 3600.0)


def backoff_seconds(
    retry_count: int,
    rng: random.Random,
    *,
    base: float = 2.0,
    cap: float = 300.0,
    retry_after: float | None = None,
) -> float:
    """Delay before attempt ``retry_count + 1``: :func:`reactor.core.backoff.backoff`, capped.

    The n-th retry waits a random time in [d/2, d] with d = min(cap, base * 2**n); a
    ``Retry-After`` from the orchestrator is honoured as a lower bound.
    """
    delay = backoff(retry_count, base=base, cap=cap, rng=rng)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


@dataclass(frozen=True)
class Decision:
    """What becomes of a job after a failed attempt."""

    status: str  # "queued" (try again) or "failed"
    retry_count: int
    delay_seconds: float


def decide_failure(
    category: str,
    retry_count: int,
    max_retries: int,
    rng: random.Random,
    *,
    retry_after: float | None = None,
    backoff_base: float = 2.0,
    backoff_cap: float = 300.0,
) -> Decision:
    """Retry a retryable failure while retries remain; otherwise fail the job."""
    if category in RETRYABLE and retry_count < max_retries:
        delay = backoff_seconds(
            retry_count, rng, base=backoff_base, cap=backoff_cap, retry_after=retry_after
        )
        return Decision("queued", retry_count + 1, delay)
    return Decision("failed", retry_count, 0.0)
