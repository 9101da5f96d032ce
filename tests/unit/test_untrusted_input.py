"""What a row, a notification or the render farm can send: parsed without raising, refused with a reason.

Property-based (Hypothesis): arbitrary JSON values and arbitrary text through the NOTIFY payload
parser and the dispatcher's reaction to it, the payload-to-request path, the orchestrator-answer
parser, the jsonb reader and the outcome sanitizer. Examples per property: tests/hypothesis_profiles.py.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reactor.core.errors import RenderError
from reactor.core.models import ClaimedJob, RenderRequest, RenderResult, Undecodable
from reactor.core.notice import Notice, parse_notice
from reactor.core.policy import MAX_PAYLOAD_DEPTH, InvalidPayload, build_request, nested_deeper_than
from reactor.db.pgtypes import lenient_loads, payload_loads
from reactor.db.store import sanitize_json
from reactor.engine.decisions import Reaction, notice_reaction
from reactor.render.client import _read_answer

ACTOR = "reactor:me"
CHANNELS = ["reactor_events", "reactor_config", "reactor_alerts", "reactor_fleet", "reactor_due",
            "reactor_schedules", "reactor_log", "other"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
#: objects shaped like our own payloads, with any value in any field
notice_fields = st.fixed_dictionaries({}, optional={
    k: json_values | st.sampled_from([1, 2, "queued", "processing", str(uuid4()), ACTOR, "started", "retrying"])
    for k in ("seq", "n", "kind", "id", "status", "old_status", "q", "f", "c", "actor", "truncated")
})


def deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


# -- NOTIFY payloads --------------------------------------------------------------------------------


@given(st.sampled_from(CHANNELS), st.text() | st.binary().map(lambda b: b.decode("utf-8", "replace")))
def test_fuzz_notice_from_any_text(channel: str, text: str) -> None:
    notice = parse_notice(channel, text)
    assert isinstance(notice.payload, dict)
    assert isinstance(notice_reaction(notice, ACTOR, {uuid4()}), Reaction)


@given(st.sampled_from(CHANNELS), notice_fields, st.sets(st.uuids(), max_size=3))
def test_fuzz_notice_fields_are_typed(channel: str, payload: dict[str, Any], inflight: set[UUID]) -> None:
    notice = parse_notice(channel, json.dumps(payload))
    for count in (notice.n, notice.queued, notice.finished, notice.cancelled):
        assert isinstance(count, int) and not isinstance(count, bool) and count >= 0
    assert notice.seq is None or (type(notice.seq) is int and notice.seq >= 0)
    assert notice.job_id is None or isinstance(notice.job_id, UUID)
    for text in (notice.kind, notice.status, notice.old_status, notice.actor):
        assert text is None or isinstance(text, str)
    assert isinstance(notice.truncated, bool)
    assert isinstance(notice_reaction(notice, ACTOR, inflight), Reaction)


@pytest.mark.parametrize("text", [deep(5000), deep(900), '{"a":' * 20 + "1" + "}" * 20, "1e99999", "[1]", "null"])
def test_notice_too_deep_or_not_an_object_is_ignored(text: str) -> None:
    notice = parse_notice("reactor_events", text)
    assert notice == Notice("reactor_events")
    assert notice_reaction(notice, ACTOR, set()) == Reaction()


def test_notice_of_one_event() -> None:
    job = uuid4()
    text = json.dumps({"seq": 7, "n": 1, "kind": "cancelled", "id": str(job), "status": "cancelled",
                       "old_status": "processing", "actor": "cli:ops"})
    notice = parse_notice("reactor_events", text)
    assert (notice.seq, notice.n, notice.kind, notice.job_id, notice.old_status) == (
        7, 1, "cancelled", job, "processing")
    # a job we render was cancelled: check what we still hold; a slot was freed: claim
    assert notice_reaction(notice, ACTOR, {job}) == Reaction(claim=True, check_lost=True)
    assert notice_reaction(notice, ACTOR, set()) == Reaction(claim=True)


@pytest.mark.parametrize(("payload", "reaction"), [
    ({"seq": 3, "n": 1, "kind": "inserted", "status": "queued", "actor": "sql"}, Reaction(claim=True)),
    ({"seq": 3, "n": 1, "kind": "retrying", "status": "queued", "old_status": "processing", "actor": "reactor:x"},
     Reaction(claim=True, due_dirty=True)),
    ({"seq": 3, "n": 1, "kind": "started", "status": "processing", "old_status": "queued", "actor": "reactor:x"},
     Reaction()),
    ({"seq": 9, "n": 4, "q": 4, "f": 0, "c": 0, "actor": "sql"}, Reaction(claim=True, due_dirty=True)),
    ({"seq": 9, "n": 2, "q": 0, "f": 2, "c": 0, "actor": "reactor:x"}, Reaction(claim=True)),
    ({"seq": 9, "n": 2, "q": 0, "f": 0, "c": 2, "actor": "cli:ops"}, Reaction()),
    ({"seq": 9, "n": 1, "kind": "inserted", "status": "queued", "actor": ACTOR}, Reaction()),  # our own
    ({"truncated": True}, Reaction(claim=True)),
    # another reactor's outcomes, claimed after in the same transaction ("claiming", 0014): the room
    # and the retries are its claim's; a job of ours among them is still checked
    ({"seq": 9, "n": 2, "q": 1, "f": 2, "c": 0, "actor": "reactor:x", "claiming": True}, Reaction(due_dirty=True)),
    ({"seq": 9, "n": 1, "kind": "completed", "status": "completed", "old_status": "processing",
      "actor": "reactor:x", "claiming": True}, Reaction()),
    ({"seq": 9, "n": 1, "kind": "retrying", "status": "queued", "old_status": "processing",
      "actor": "reactor:x", "claiming": True}, Reaction(due_dirty=True)),
    # its claim took all it asked for with room left ("more"): the others claim too
    ({"seq": 9, "n": 3, "q": 0, "f": 0, "c": 0, "actor": "reactor:x", "more": True}, Reaction(claim=True)),
    ({"seq": 9, "n": 1, "kind": "started", "status": "processing", "old_status": "queued", "actor": "reactor:x",
      "more": True}, Reaction(claim=True)),
    ({"seq": 9, "n": 3, "q": 0, "f": 0, "c": 0, "actor": "reactor:x", "more": "yes"}, Reaction()),  # not a bool
])
def test_reaction_to_events(payload: dict[str, Any], reaction: Reaction) -> None:
    assert notice_reaction(parse_notice("reactor_events", json.dumps(payload)), ACTOR, set()) == reaction


#: what run_cycle() sends on reactor_log (migration 0017): another reactor's outcomes, all finished
#: (none queued again, none cancelled), then its claim in the same transaction, without "more"
OTHERS = st.sampled_from(["reactor:x", "reactor:y"])
quiet_cycles = st.one_of(
    # f outcomes and the jobs claimed after them
    st.builds(lambda seq, f, claimed, actor: {"seq": seq, "n": f + claimed, "q": 0, "f": f, "c": 0,
                                               "actor": actor, "claiming": True},
              st.integers(1, 10**9), st.integers(1, 50), st.integers(0, 50), OTHERS),
    st.builds(lambda seq, kind, job, actor: {"seq": seq, "n": 1, "kind": kind, "id": str(job), "status": kind,
                                             "old_status": "processing", "actor": actor, "claiming": True},
              st.integers(1, 10**9), st.sampled_from(["completed", "failed"]), st.uuids(), OTHERS),
)


@given(quiet_cycles, st.sets(st.uuids(), max_size=3))
def test_what_goes_on_reactor_log_would_ask_nothing_of_another_dispatcher(
        payload: dict[str, Any], inflight: set[UUID]) -> None:
    """The rule of 0017 agrees with the dispatcher's: had such a notice come on reactor_events, no
    other reactor would have claimed, re-read its due time or checked what it holds (the job of a
    one-event notice was held by its writer, so it is in no other reactor's ``inflight``)."""
    if "id" in payload:
        inflight.discard(UUID(payload["id"]))
    assert notice_reaction(parse_notice("reactor_events", json.dumps(payload)), ACTOR, inflight) == Reaction()
    # and on reactor_log itself, whatever it says, a dispatcher does nothing
    assert notice_reaction(parse_notice("reactor_log", json.dumps(payload | {"more": True})), ACTOR,
                           inflight) == Reaction()


def test_reaction_to_other_channels() -> None:
    assert notice_reaction(parse_notice("reactor_config", ""), ACTOR, set()) == Reaction(claim=True, due_dirty=True)
    assert notice_reaction(parse_notice("reactor_alerts", '{"alert": "x"}'), ACTOR, set()) == Reaction()
    # a job delayed to a future run_after: re-read the due time (anyone may send it: it costs one read)
    assert notice_reaction(parse_notice("reactor_due", "{}"), ACTOR, set()) == Reaction(due_dirty=True)
    assert notice_reaction(parse_notice("reactor_schedules", "{}"), ACTOR, set()) == Reaction()
    many_cancelled = parse_notice("reactor_events", '{"n": 3, "c": 3, "actor": "sql"}')
    assert notice_reaction(many_cancelled, ACTOR, {uuid4()}) == Reaction(check_lost=True)


# -- a job's payload ----------------------------------------------------------------------------------


def claimed(payload: Any, defaults: Any = None, field: str = "question") -> ClaimedJob:
    return ClaimedJob(
        id=uuid4(), job_type="doubt", priority="medium", payload=payload, user_id=None, renderer="manim",
        retry_count=0, max_retries=3, attempt=1, created_at=datetime.now(UTC), input_field=field,
        type_defaults={} if defaults is None else defaults, timeout_minutes=10,
    )


def check_request(payload: Any, defaults: Any, field: str) -> None:
    try:
        request = build_request(claimed(payload, defaults, field))
    except InvalidPayload as exc:
        assert str(exc)  # refused, with a reason
        return
    assert isinstance(request, RenderRequest)
    assert all(isinstance(v, str) and v for v in request.to_json().values())


@given(json_values, json_values, st.sampled_from(["question", "topic", "date", ""]))
def test_fuzz_request_from_any_payload(payload: Any, defaults: Any, field: str) -> None:
    check_request(payload, defaults, field)


@given(st.dictionaries(st.sampled_from(["question", "style", "length", "voice", "x"]), json_values, max_size=5),
       st.dictionaries(st.sampled_from(["style", "length", "voice"]), json_values, max_size=3))
def test_fuzz_request_from_payload_objects(payload: dict[str, Any], defaults: dict[str, Any]) -> None:
    check_request(payload, defaults, "question")


def test_payload_depth_limit() -> None:
    def nest(depth: int) -> Any:
        value: Any = {"question": "q"}
        for _ in range(depth - 1):
            value = {"question": "q", "x": value}
        return value

    assert not nested_deeper_than(nest(MAX_PAYLOAD_DEPTH), MAX_PAYLOAD_DEPTH)
    assert nested_deeper_than(nest(MAX_PAYLOAD_DEPTH + 1), MAX_PAYLOAD_DEPTH)
    assert not nested_deeper_than({}, 1) and nested_deeper_than({"a": []}, 1)
    assert not nested_deeper_than("text", 0)
    build_request(claimed(nest(MAX_PAYLOAD_DEPTH)))
    with pytest.raises(InvalidPayload, match="nested more than 64 levels deep"):
        build_request(claimed(nest(MAX_PAYLOAD_DEPTH + 1)))
    with pytest.raises(InvalidPayload, match="payload is nested too deep to decode"):
        build_request(claimed(Undecodable("is nested too deep to decode")))
    with pytest.raises(InvalidPayload, match="the defaults of job type doubt cannot be used"):
        build_request(claimed({"question": "q"}, Undecodable("is nested too deep to decode")))


# -- jsonb as read from the database ------------------------------------------------------------------


@given(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_fuzz_jsonb_reader_never_raises(data: bytes) -> None:
    for loads in (lenient_loads, payload_loads):
        loads(data)


@pytest.mark.parametrize("depth", [900, 2000, 9000])
def test_jsonb_reader_on_deep_values(depth: int) -> None:
    lenient = lenient_loads(deep(depth).encode())
    if depth >= 2000:
        assert lenient == Undecodable("is nested too deep to decode")
    assert payload_loads(deep(depth).encode()) in (
        Undecodable("is nested too deep to decode"), Undecodable("is nested more than 64 levels deep"))


def test_jsonb_reader_size_limit() -> None:
    got = payload_loads(json.dumps({"question": "x" * 300_000}).encode())
    assert isinstance(got, Undecodable) and got.reason == "is 300016 bytes as JSON text; at most 262144"
    assert lenient_loads(json.dumps({"question": "x" * 300_000}).encode())["question"] == "x" * 300_000


# -- the orchestrator's answer ------------------------------------------------------------------------

answers = st.fixed_dictionaries({}, optional={
    "video_url": json_values | st.sampled_from(["https://cdn.example/v.mp4", "http://x/\u0000", "ftp://x"]),
    "thumbnail_url": json_values | st.just("https://cdn.example/t.jpg"),
    "duration": json_values | st.floats() | st.just(1.5),
    "processing_time_ms": json_values | st.just(120),
})


@given(st.integers(100, 599), st.text() | st.binary().map(lambda b: b.decode("utf-8", "replace"))
       | answers.map(json.dumps), st.none() | st.text(max_size=40))
def test_fuzz_orchestrator_answer(status: int, body: str, retry_after: str | None) -> None:
    try:
        result = _read_answer(status, body, retry_after)
    except RenderError as exc:
        assert exc.category in ("TIMEOUT", "API_ERROR", "INVALID_INPUT", "NOT_FOUND", "UNKNOWN")
        assert exc.message
        assert exc.retry_after is None or (math.isfinite(exc.retry_after) and exc.retry_after >= 0)
        return
    assert 200 <= status < 300 and isinstance(result, RenderResult)
    json.dumps(result.to_json(), allow_nan=False)  # storable as jsonb


@pytest.mark.parametrize("body", [
    deep(5000), '{"video_url": "https://x/v.mp4", "duration": Infinity, "processing_time_ms": 1}',
    '{"video_url": "https://x/v.mp4", "duration": NaN, "processing_time_ms": 1}',
    '{"video_url": "https://x/v.mp4", "duration": 1e999, "processing_time_ms": 1}',
])
def test_answers_that_cannot_be_stored_are_malformed(body: str) -> None:
    with pytest.raises(RenderError) as err:
        _read_answer(200, body, None)
    assert err.value.category == "UNKNOWN" and err.value.message.startswith("malformed answer")


# -- outcomes on their way to jsonb ---------------------------------------------------------------------


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(alphabet=st.characters(exclude_categories=())),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20))
def test_fuzz_sanitized_outcomes_are_valid_json_for_jsonb(value: Any) -> None:
    text = json.dumps(sanitize_json(value), allow_nan=False)
    assert "\\u0000" not in text
    text.encode("utf-8")  # no lone surrogates left


def test_sanitize_json_examples() -> None:
    assert sanitize_json({"body": "a\x00b\ud800c", "n": [float("inf"), 1.5]}) == {"body": "ab?c", "n": [None, 1.5]}
