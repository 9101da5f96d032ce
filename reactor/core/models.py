"""Data that crosses a boundary: claimed jobs, render requests and results, job outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

__all__ = ["CacheDecision", "ClaimedJob", "Outcome", "RenderRequest", "RenderResult", "Undecodable", "parse_uuid"]


class Undecodable(dict[str, str]):
    """A JSON value read from the database that could not be used, in place of the value.

    It reads as ``{"undecodable": reason}``, so a reader that only shows it (a log, the dashboard)
    needs no special case; the dispatcher checks for it and fails that job alone, saying why.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(undecodable=reason)
        self.reason = reason


@dataclass(frozen=True)
class ClaimedJob:
    """A job this reactor holds the lease of (one row of ``reactor.claim_jobs``)."""

    id: UUID
    job_type: str
    priority: str
    payload: dict[str, Any]
    user_id: UUID | None
    renderer: str
    retry_count: int
    max_retries: int
    attempt: int
    created_at: datetime
    input_field: str
    type_defaults: dict[str, Any]
    timeout_minutes: int
    #: the render cache's key of its request (migration 0013), None when it does not use the cache
    cache_key: str | None = None
    #: the cache's word at the claim: render (no render to share: render it, nothing more to ask),
    #: hit, wait or ask (ask ``reactor.render_cache_take`` before rendering)
    cache_state: str | None = None


@dataclass(frozen=True, slots=True)
class RenderRequest:
    """Body of ``POST {orchestrator}/render``. Built (and checked) by ``policy.build_request``;
    a plain dataclass because it is made once per attempt on the hot path."""

    job_id: UUID
    job_type: str
    input: str
    style: str
    length: str
    voice: str

    def to_json(self) -> dict[str, str]:
        return {"job_id": str(self.job_id), "job_type": self.job_type, "input": self.input,
                "style": self.style, "length": self.length, "voice": self.voice}


class RenderResult(BaseModel):
    """A 2xx answer of the orchestrator, validated before it is stored in ``jobs.result``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    video_url: HttpUrl
    thumbnail_url: HttpUrl | None = None
    #: finite: the result is stored as jsonb, which has no Infinity or NaN
    duration: float = Field(ge=0, allow_inf_nan=False)
    processing_time_ms: int = Field(ge=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "video_url": str(self.video_url),
            "thumbnail_url": str(self.thumbnail_url) if self.thumbnail_url else None,
            "duration": self.duration,
            "processing_time_ms": self.processing_time_ms,
        }


@dataclass
class Outcome:
    """How one attempt ended, as written back to the job (lease-checked)."""

    job_id: UUID
    attempt: int
    status: str  # completed | queued | failed
    retry_count: int
    result: dict[str, Any] | None = None
    delay_seconds: float = 0.0
    error_category: str | None = None
    error_message: str | None = None
    error_details: dict[str, Any] | None = field(default=None)
    #: the render cache's key of the request this attempt rendered (its waiters settle with it)
    cache_key: str | None = None


@dataclass(frozen=True)
class CacheDecision:
    """What the render cache says of a job about to render (``reactor.render_cache_take``)."""

    kind: str  # render | hit | wait
    source: UUID | None = None  # hit: the job that rendered it; wait: the job that renders it
    result: dict[str, Any] | None = None  # hit: the result to complete with


def parse_uuid(value: object) -> UUID | None:
    """A UUID from untrusted input (a NOTIFY payload, a token, a client message), or None."""
    if not isinstance(value, str):
        return None
    try:
        return UUID(value)
    except ValueError:
        return None
