"""Fuzz the payload-to-request path with a real PostgreSQL: arbitrary JSON and arbitrary text as
``jobs.payload``, inserted with SQL, claimed by the reactor's own claim on its own connection, turned
into a render request, and the outcome written back.

The property: the INSERT is accepted or refused by PostgreSQL (the payload guard names the field);
an accepted job is claimed and becomes a request or is refused with a reason (INVALID_INPUT), and
its outcome is stored. Nothing else raises. Run once with the door (migration 0006) and once as
rows written before it, which only the reactor's own checks stand between and the renderer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import given
from hypothesis import strategies as st

from reactor.core.models import Outcome
from reactor.core.policy import InvalidPayload, build_request
from reactor.db.store import Database
from tests.support.legacy import without_payload_guard

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)
payload_objects = st.dictionaries(
    st.sampled_from(["question", "topic", "date", "style", "length", "voice"]) | st.text(max_size=8),
    json_values | st.text(min_size=60, max_size=5000), max_size=6)
#: payloads close to real ones: every input field filled, the options anything
near_valid = st.fixed_dictionaries(
    {f: st.text(min_size=1, max_size=300) for f in ("question", "topic", "date")},
    optional={k: st.text(max_size=70) | json_values for k in ("style", "length", "voice", "cache")})
deep_text = st.integers(0, 11_000).map(lambda d: '{"question": "q", "x": ' + "[" * d + "]" * d + "}")
any_text = st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace"))
payload_texts = (near_valid.map(json.dumps) | payload_objects.map(json.dumps) | json_values.map(json.dumps)
                 | deep_text | any_text)


class Probe:
    """One test database, a sync connection for the INSERTs and the reactor's Database for claims."""

    def __init__(self, dsn: str, portal: BlockingPortal) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 1000000, "
                          "max_manim_renders = 1000000")
        self.portal = portal
        self.db = Database(dsn, "fuzz")
        portal.call(self.db.open)
        self.seen = {"refused at insert": 0, "rendered": 0, "invalid input": 0}

    def close(self) -> None:
        self.portal.call(self.db.close)
        self.conn.close()

    def run(self, job_type: str, text: str) -> None:
        try:
            self.conn.execute("INSERT INTO jobs (job_type, payload) VALUES (%s, %s::jsonb)", (job_type, text))
        except psycopg.errors.CheckViolation as exc:
            # the payload guard, or jobs_before_write (not an object): named, and said why
            assert exc.diag.column_name == "payload", exc
            assert str(exc).startswith("jobs.payload"), exc
            self.seen["refused at insert"] += 1
            return
        except psycopg.DataError:  # not JSON at all, NUL bytes, past PostgreSQL's own nesting limit
            self.seen["refused at insert"] += 1
            return
        except psycopg.errors.StatementTooComplex:
            self.seen["refused at insert"] += 1
            return
        written, [job] = self.portal.call(self.db.finish_and_claim, [], 1, 30.0, datetime.now(UTC))
        try:
            request = build_request(job)
        except InvalidPayload as exc:
            assert str(exc)
            outcome = Outcome(job.id, job.attempt, "failed", 0, error_category="INVALID_INPUT",
                              error_message=str(exc), error_details={"payload": job.payload})
            self.seen["invalid input"] += 1
        else:
            assert request.job_id == job.id and request.input
            outcome = Outcome(job.id, job.attempt, "completed", 0, result={
                "video_url": "https://cdn.example/v.mp4", "echo": request.to_json()})
            self.seen["rendered"] += 1
        written, claimed = self.portal.call(self.db.finish_and_claim, [outcome], 0, 30.0, datetime.now(UTC))
        assert written == {job.id} and claimed == []


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal("asyncio") as p:
        yield p


@pytest.fixture
def probe(dsn: str, portal: BlockingPortal) -> Iterator[Probe]:
    p = Probe(dsn, portal)
    try:
        yield p
    finally:
        p.close()
    print(f"fuzz payload path: {p.seen}")  # noqa: T201 - the figures for a by-hand run (-s)


@pytest.fixture
def legacy_probe(dsn: str, portal: BlockingPortal) -> Iterator[Probe]:
    with without_payload_guard(dsn):  # rows as written before the payload guard
        p = Probe(dsn, portal)
        try:
            yield p
        finally:
            p.close()
    print(f"fuzz payload path, no guard: {p.seen}")  # noqa: T201


@given(st.sampled_from(["doubt", "topic_short", "daily_ca"]), payload_texts)
def test_fuzz_payload_through_insert_claim_and_request(probe: Probe, job_type: str, text: str) -> None:
    probe.run(job_type, text)


@given(st.sampled_from(["doubt", "topic_short", "daily_ca"]), payload_texts)
def test_fuzz_payload_written_before_the_guard(legacy_probe: Probe, job_type: str, text: str) -> None:
    legacy_probe.run(job_type, text)


def test_probe_sees_every_kind(probe: Probe) -> None:
    """The fuzz tests can tell the three results apart (so a property that always refuses would show)."""
    probe.run("doubt", json.dumps({"question": "why?"}))
    probe.run("doubt", json.dumps({"question": "why?", "style": 3}))
    probe.run("doubt", json.dumps({}))
    assert probe.seen == {"refused at insert": 1, "rendered": 1, "invalid input": 1}
