"""The feed's door, without I/O: the message parser, seqs from clients, single headers, the
connection gate and the request bucket."""

from __future__ import annotations

import json

import pytest
from websockets.datastructures import Headers

from reactor.web.gate import Gate, TokenBucket
from reactor.web.protocol import BadRequest, ClientRefused, nonneg_int, parse, single_header


def refused(raw: str | bytes) -> ClientRefused:
    with pytest.raises(ClientRefused) as info:
        parse(raw)
    return info.value


# -- b. messages ------------------------------------------------------------------------------------


def test_a_plain_message_parses() -> None:
    assert parse('{"type": "auth", "token": "t", "since": 3}') == {"type": "auth", "token": "t", "since": 3}
    assert parse('{"type": "job", "id": "x", "request_id": "é😀", "n": 1.5}')["request_id"] == "é😀"


@pytest.mark.parametrize("raw", [
    "[" * 5000 + "]" * 5000,
    "[" * 5000,
    '{"type": "auth", "x": ' + "[" * 8000 + "}",
    '{"type": "auth", "x": ' + '{"a":' * 1500 + "1" + "}" * 1500 + "}",
    '{"type": "job", "x": [[[[[[[[[[1]]]]]]]]]]}',
])
def test_deep_nesting_is_refused_before_parsing(raw: str) -> None:
    exc = refused(raw)
    assert (exc.code, exc.metric) == (1008, "bad_message")
    assert exc.reason == "malformed message: nested too deep"


def test_brackets_inside_strings_do_not_count() -> None:
    assert parse(json.dumps({"type": "job", "id": "[" * 5000}))["id"] == "[" * 5000


@pytest.mark.parametrize("raw", [
    '{"type": "auth", "since": 1e999}',
    '{"type": "auth", "since": -1e999}',
    '{"type": "auth", "since": NaN}',
    '{"type": "auth", "since": Infinity}',
    '{"type": "auth", "since": -Infinity}',
    '{"type": "auth", "since": 1' + "0" * 30 + "}",
    '{"type": "auth", "since": -1' + "0" * 30 + "}",
    '{"type": "auth", "since": 1' + "0" * 5000 + "}",  # past int's 4,300-digit limit too
])
def test_numbers_nobody_means_are_refused(raw: str) -> None:
    assert refused(raw).reason == "malformed message: not JSON"


@pytest.mark.parametrize("raw", ['{"type": "job", "request_id": "\\ud800"}', '{"type": "job", "\\udfff": 1}'])
def test_lone_surrogates_are_refused(raw: str) -> None:
    # they parse, but could never be sent back (request_id is echoed): refused at the door
    assert refused(raw).reason == "malformed message: invalid unicode"


def test_a_surrogate_pair_is_fine() -> None:
    assert parse('{"type": "job", "request_id": "\\ud83d\\ude00"}')["request_id"] == "😀"


@pytest.mark.parametrize("raw", ["", "hello", "[]", "1", '"auth"', '{"type": 1}', '{"kind": "auth"}', "{'type': 1}"])
def test_not_an_object_with_a_type(raw: str) -> None:
    assert refused(raw).code == 1008


def test_binary_is_unsupported_data() -> None:
    assert refused(b'{"type": "auth"}').code == 1003


# -- c. since --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "١٢٣", "１２", "²", "1²", "৩", "߁", " 1", "1 ", "+1", "-1", "1.0", "", "1_000", "1" * 19, -1, 2**62, 1.0,
    True, None, [1], {"a": 1},
])
def test_since_must_be_a_whole_number_in_ascii(value: object) -> None:
    assert nonneg_int(value) is None


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (12, 12), ("12", 12), ("0", 0), (2**62 - 1, 2**62 - 1)])
def test_since_accepted(value: object, expected: int) -> None:
    assert nonneg_int(value) == expected


# -- d. headers -------------------------------------------------------------------------------------


def test_a_header_twice_is_a_bad_request() -> None:
    headers = Headers([("Origin", "https://a.example"), ("origin", "https://b.example")])
    with pytest.raises(BadRequest, match="more than one Origin header"):
        single_header(headers, "Origin")
    assert single_header(Headers([("Authorization", "Bearer x")]), "Authorization") == "Bearer x"
    assert single_header(Headers(), "Authorization") is None


# -- e. the gate -----------------------------------------------------------------------------------


def test_the_oldest_unauthenticated_connection_makes_room() -> None:
    gate: Gate[str] = Gate(max_clients=2, max_unauthenticated=3)
    assert [gate.opened(c) for c in "abc"] == [None, None, None]
    assert gate.opened("d") == "a"  # the oldest, who had the longest to sign in
    assert gate.unauthenticated == 3
    assert not gate.authenticate("a")  # pushed out: it cannot come back in
    assert gate.authenticate("b") and gate.authenticate("b")
    assert gate.unauthenticated == 2 and gate.authenticated == 1
    # authenticated ones are never pushed out, and idle ones cannot take their places
    assert [gate.opened(c) for c in "efgh"] == [None, "c", "d", "e"]
    assert gate.authenticated == 1 and gate.unauthenticated == 3
    assert gate.authenticate("h") and gate.full
    assert not gate.authenticate("g")  # max_clients: refused, still waiting until it closes
    gate.closed("b")
    assert gate.authenticate("g")
    for conn in ("g", "h", "f", "nobody"):
        gate.closed(conn)
    assert gate.authenticated == gate.unauthenticated == 0


def test_a_connection_closed_while_its_token_is_checked_is_not_counted() -> None:
    gate: Gate[str] = Gate(max_clients=5, max_unauthenticated=5)
    gate.opened("a")
    gate.closed("a")
    assert not gate.authenticate("a")
    assert gate.authenticated == 0


# -- f. the request bucket ---------------------------------------------------------------------------


def test_the_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=20.0, burst=40)
    assert all(bucket.take(0.0) for _ in range(40))
    assert not bucket.take(0.0)
    assert bucket.take(0.0625)  # one more every 50 ms
    assert not bucket.take(0.0625)
    assert 18 <= sum(bucket.take(0.0625 + i * 0.01) for i in range(100)) <= 20  # about 20/s over one second
    assert all(bucket.take(1000.0) for _ in range(40))  # refilled, never beyond the burst
    assert not bucket.take(1000.0)


def test_the_bucket_ignores_a_clock_going_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(5.5)
    assert bucket.take(6.6)


# -- settings ----------------------------------------------------------------------------------------


def test_the_feed_flags_reach_its_settings() -> None:
    from reactor.cli.main import build_parser
    from reactor.cli.settings import feed_settings
    from reactor.core.environment import Environment
    from reactor.web.feed import FeedSettings

    env = Environment.read({"REACTOR_JWT_SECRET": "cli-secret-0123456789abcdef-0123456789"})
    assert "cli-secret" not in repr(env)
    args = build_parser().parse_args([
        "run", "--listen", "127.0.0.1:0", "--max-clients", "600", "--max-unauthenticated", "50",
        "--request-rate", "5", "--request-burst", "10",
    ])
    settings = feed_settings(args, env)
    assert isinstance(settings, FeedSettings) and settings.auth.jwt_secret == env.jwt_secret
    assert (settings.max_clients, settings.unauthenticated_limit) == (600, 50)
    assert (settings.request_rate, settings.request_burst) == (5.0, 10)
    assert "cli-secret" not in repr(settings)
    defaults = feed_settings(build_parser().parse_args(["run", "--listen", ":0"]), env)
    assert isinstance(defaults, FeedSettings)
    assert (defaults.max_clients, defaults.unauthenticated_limit) == (1000, 500)
    assert (defaults.request_rate, defaults.request_burst) == (20.0, 40)
    assert FeedSettings(auth=defaults.auth, max_clients=50).unauthenticated_limit == 100


@pytest.mark.parametrize("bad", [{"max_clients": 0}, {"max_unauthenticated": 0}, {"request_rate": 0.0},
                                 {"request_burst": 0}])
def test_nonsense_feed_limits_fail_fast(bad: dict[str, object]) -> None:
    from reactor.core.errors import ConfigError
    from reactor.web.auth import AuthSettings
    from reactor.web.feed import FeedSettings

    with pytest.raises(ConfigError, match="must be"):
        FeedSettings(auth=AuthSettings(jwt_secret="x" * 32), **bad)  # type: ignore[arg-type]
