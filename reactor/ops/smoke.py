"""``reactor smoke``: after a deployment, one real job all the way through, step by step.

Submits one job the way users do (plain SQL, or PostgREST with ``--rest-url`` and a key), checks it
is queued, waits for it to complete, checks ``result.video_url`` is there and that the URL answers.
Each step is printed with its time; the first failure ends the run, naming the step, with exit
code 1. The job is marked (``payload.smoke = true``, job type ``topic_short`` by default) so it is
easy to find and clean up: ``DELETE FROM jobs WHERE payload->>'smoke' = 'true'``. It never leaves
the job running: on timeout (or Ctrl-C) it cancels it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from reactor.core.errors import DatabaseError, ReactorError
from reactor.db.session import Session

__all__ = ["SmokeFailed", "SmokeSettings", "run_smoke"]


class SmokeFailed(ReactorError):
    """A step of the smoke test failed."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"step '{step}' failed: {reason}")
        self.step = step
        self.reason = reason


@dataclass
class SmokeSettings:
    dsn: str | None = None
    rest_url: str | None = None
    rest_key: str | None = None
    job_type: str = "topic_short"
    input_text: str = "reactor smoke test"
    timeout_s: float = 90.0
    max_retries: int = 0
    poll_s: float = 0.25
    print_fn: Callable[[str], None] = field(default=lambda line: None)


class _Store:
    """Where the job is submitted and read: the database, or PostgREST."""

    def __init__(self, s: SmokeSettings) -> None:
        self.s = s
        self.http = httpx.Client(timeout=10.0)
        self.conn: Session | None = None
        if s.rest_url is None:
            if not s.dsn:
                raise ReactorError("no database given: pass --dsn DSN or set DATABASE_URL (or use --rest-url)")
            try:
                self.conn = Session.connect(s.dsn, connect_timeout=10, application_name=None)
            except DatabaseError as exc:
                raise SmokeFailed("connect", " ".join(str(exc.__cause__ or exc).split())) from exc

    def close(self) -> None:
        self.http.close()
        if self.conn is not None:
            self.conn.close()

    def _rest_headers(self) -> dict[str, str]:
        key = self.s.rest_key or ""
        return {"apikey": key, "Authorization": f"Bearer {key}", "Content-Type": "application/json",
                "Prefer": "return=representation"}

    def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self.conn is not None:
            row = self.conn.one("smoke_submit", {"job_type": self.s.job_type, "payload": json.dumps(payload),
                                                 "max_retries": self.s.max_retries})
            assert row is not None
            return row
        assert self.s.rest_url
        r = self.http.post(
            f"{self.s.rest_url.rstrip('/')}/rest/v1/jobs", headers=self._rest_headers(),
            json={"job_type": self.s.job_type, "priority": "high", "payload": payload,
                  "max_retries": self.s.max_retries},
        )
        if r.status_code >= 300:
            raise SmokeFailed("submit", f"PostgREST answered {r.status_code}: {r.text[:300]}")
        body = r.json()
        return dict(body[0] if isinstance(body, list) else body)

    def read(self, job_id: str) -> dict[str, Any]:
        if self.conn is not None:
            row = self.conn.one("smoke_read", {"id": job_id})
            if row is None:
                raise SmokeFailed("wait for completion", f"job {job_id} disappeared")
            return row
        assert self.s.rest_url
        r = self.http.get(
            f"{self.s.rest_url.rstrip('/')}/rest/v1/jobs", headers=self._rest_headers(),
            params={"id": f"eq.{job_id}", "select": "id,status,queue_position,result,error_category,"
                                                     "error_message,retry_count"},
        )
        if r.status_code >= 300 or not r.json():
            raise SmokeFailed("wait for completion", f"cannot read job {job_id}: {r.status_code} {r.text[:200]}")
        return dict(r.json()[0])

    def cancel(self, job_id: str) -> None:
        if self.conn is not None:
            self.conn.run("smoke_cancel", {"id": job_id})
            return
        assert self.s.rest_url
        self.http.patch(
            f"{self.s.rest_url.rstrip('/')}/rest/v1/jobs", headers=self._rest_headers(),
            params={"id": f"eq.{job_id}", "status": "in.(queued,processing)"}, json={"status": "cancelled"},
        )


def run_smoke(s: SmokeSettings) -> dict[str, Any]:
    """Run every step; returns a summary, or raises SmokeFailed naming the step."""
    t0 = time.monotonic()

    def step(name: str, detail: str) -> None:
        s.print_fn(f"[{time.monotonic() - t0:7.3f} s] ok    {name}: {detail}")

    store = _Store(s)
    job_id: str | None = None
    finished = False
    try:
        payload = {"topic": s.input_text, "question": s.input_text, "date": datetime.now(UTC).date().isoformat(),
                   "smoke": True, "submitted_at": datetime.now(UTC).isoformat(),
                   "cache": False}  # the render path itself, never the render cache
        try:
            row = store.submit(payload)
        except DatabaseError as exc:
            raise SmokeFailed("submit", " ".join(str(exc.__cause__ or exc).split())) from exc
        job_id = str(row["id"])
        step("submit", f"job {job_id} ({s.job_type}) via {'PostgREST' if s.rest_url else 'SQL'}")
        if row["status"] not in ("queued", "processing", "completed"):
            raise SmokeFailed("queued", f"the new job is {row['status']}")
        step("queued", f"status {row['status']}, queue position {row.get('queue_position')}")

        deadline = time.monotonic() + s.timeout_s
        seen_error: str | None = None
        while True:
            job = store.read(job_id)
            if job["status"] == "completed":
                break
            if job["status"] in ("failed", "cancelled"):
                finished = True
                raise SmokeFailed(
                    "wait for completion",
                    f"job {job['status']}: {job.get('error_category')} {job.get('error_message')}",
                )
            if job.get("error_message") and job["error_message"] != seen_error:
                seen_error = job["error_message"]
                s.print_fn(f"[{time.monotonic() - t0:7.3f} s] note  attempt failed: "
                           f"{job.get('error_category')} {seen_error}; retrying")
            if time.monotonic() > deadline:
                store.cancel(job_id)
                finished = True
                raise SmokeFailed(
                    "wait for completion",
                    f"not completed within {s.timeout_s:g} s (status {job['status']}); the job was cancelled",
                )
            time.sleep(s.poll_s)
        finished = True
        step("completed", f"after {time.monotonic() - t0:.2f} s")

        result = job.get("result") or {}
        url = result.get("video_url") if isinstance(result, dict) else None
        if not url:
            raise SmokeFailed("result", f"result has no video_url: {json.dumps(result)[:300]}")
        step("result", f"video_url {url}")

        try:
            r = store.http.head(url, follow_redirects=True)
            if r.status_code in (405, 501):
                r = store.http.get(url, headers={"Range": "bytes=0-0"}, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise SmokeFailed("video reachable", f"{url}: {exc!r}") from exc
        if r.status_code >= 400:
            raise SmokeFailed("video reachable", f"{url} answered {r.status_code}")
        step("video reachable", f"{url} answered {r.status_code}")
        return {"job_id": job_id, "seconds": round(time.monotonic() - t0, 3), "video_url": url}
    finally:
        if job_id is not None and not finished:
            # interrupted or failed before the job finished: never leave it running
            with contextlib.suppress(DatabaseError, httpx.HTTPError):
                store.cancel(job_id)
        store.close()
