"""Property tests (Hypothesis) of everything a client sends the feed: its messages, its ``since``,
and its tokens. The property: nothing escapes but the module's own refusal (``ClientRefused`` from the
feed's parser, ``AuthError`` from the token check), and a refusal carries a short reason.

Examples per test: the ``ci`` profile (200); ``HYPOTHESIS_PROFILE=many`` for a long run by hand
(tests/hypothesis_profiles.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from reactor.web import dashboard, wire
from reactor.web.auth import Authenticator, AuthError, AuthSettings, Principal
from reactor.web.protocol import ClientRefused, auth_message, nonneg_int, parse

SECRET = "fuzz-test-shared-secret-0123456789abcdef"
AUTH = Authenticator(AuthSettings(jwt_secret=SECRET, audience="authenticated"))

# -- strategies ------------------------------------------------------------------------------------

#: any JSON value Python's json module writes, NaN, Infinity and big integers included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
#: digits of every script, signs, dots, exponents: what a since or a number might be written as
numberish = st.text(alphabet=st.characters(categories=["Nd", "No"]) | st.sampled_from("+-.eE _"), max_size=30)
since_values = (
    numberish | json_values | st.integers() | st.floats()
    | st.from_regex(r"-?[0-9]{1,40}(\.[0-9]{1,5})?([eE][+-]?[0-9]{1,4})?", fullmatch=True)
)
types = st.sampled_from(["auth", "job", "status", "action", "subscribe", ""]) | st.text(max_size=8)


@st.composite
def messages(draw: st.DrawFn) -> str:
    """Text a client might send: near-valid messages, raw JSON, deep nesting, numbers and junk."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.text(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values))
    if kind == 2:
        depth = draw(st.integers(1, 4000))
        opener = draw(st.sampled_from(["[", '{"a":', '{"type": "auth", "since": [']))
        return opener * depth + draw(st.sampled_from(["", "1", "]" * depth, "}" * depth]))
    if kind == 3:
        number = draw(st.from_regex(r"-?[0-9]{1,5000}(\.[0-9]+)?([eE][+-]?[0-9]{1,5})?", fullmatch=True)
                      | st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "0e0"]))
        return '{"type": "auth", "token": "t", "since": ' + number + "}"
    body: dict[str, Any] = {"type": draw(types)}
    for key in draw(st.lists(st.sampled_from(["token", "since", "id", "request_id", "action", "values"]),
                             max_size=4, unique=True)):
        body[key] = draw(since_values if key == "since" else json_values)
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    if kind == 5 and len(text) > 2:  # a surrogate escape, a cut, or a byte flipped
        cut = draw(st.integers(1, len(text) - 1))
        text = draw(st.sampled_from([
            text[:cut], text[:cut] + "\\ud800" + text[cut:], text[:cut] + "\x00" + text[cut:]]))
    return text


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sign(header: str, claims: str) -> str:
    mac = hmac.new(SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(mac)}"


header_dicts = st.fixed_dictionaries({}, optional={
    "alg": st.sampled_from(["HS256", "RS256", "ES256", "none", "HS384"]) | json_values,
    "kid": st.text(max_size=10) | json_values,
    "typ": st.just("JWT") | json_values,
    "crit": st.lists(st.sampled_from(["b64", "exp", "x"]), max_size=3) | json_values,
    "b64": st.booleans() | json_values,
})
claim_dicts = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["service_role", "authenticated", "anon", "admin"]) | json_values,
    "sub": st.uuids().map(str) | json_values,
    "exp": st.integers(int(time.time()), int(time.time()) + 10**6) | st.integers() | st.floats() | json_values,
    "nbf": st.integers() | st.floats() | json_values,
    "iat": st.integers() | st.floats() | json_values,
    "aud": st.sampled_from(["authenticated", "other"]) | st.lists(st.text(max_size=15), max_size=3) | json_values,
    "app_metadata": st.fixed_dictionaries({}, optional={"role": st.just("admin") | json_values,
                                                        "admin": st.just(True) | json_values}) | json_values,
    "user_metadata": json_values,
})


def check_token(token: str) -> None:
    """verify and authenticate give a Principal or an AuthError with a short reason, nothing else."""
    def verify() -> Principal:
        return AUTH.verify(token)

    def authenticate() -> Principal:
        return asyncio.run(AUTH.authenticate(token))

    for attempt in (verify, authenticate):
        try:
            principal = attempt()
        except AuthError as exc:
            assert str(exc) and len(str(exc)) <= 100, str(exc)
        else:
            assert isinstance(principal, Principal)
            assert principal.admin or principal.user_id is not None


# -- the feed's parser ------------------------------------------------------------------------------


@given(messages())
@example("[" * 5000)
@example('{"type": "auth", "since": ' + "9" * 5000 + "}")
@example('{"type": "job", "request_id": "\\udfff"}')
def test_parse_accepts_an_object_with_a_type_or_refuses(raw: str) -> None:
    try:
        msg = parse(raw)
    except ClientRefused as exc:
        assert exc.code in (1003, 1008) and exc.reason.startswith(("malformed message", "binary"))
        return
    assert isinstance(msg, dict) and isinstance(msg["type"], str)
    # whatever it accepts can be sent back (the dashboard echoes request_id)
    rid = dashboard.request_id(msg.get("request_id"))
    wire.dumps({"type": msg["type"], "request_id": rid, "echo": msg})


@given(st.binary(max_size=100))
def test_parse_refuses_binary(raw: bytes) -> None:
    try:
        parse(raw)
    except ClientRefused as exc:
        assert exc.code == 1003
    else:
        raise AssertionError("binary accepted")


@given(messages())
def test_an_auth_message_gives_a_token_and_a_seq_or_a_refusal(raw: str) -> None:
    try:
        token, since = auth_message(parse(raw))
    except ClientRefused as exc:
        assert exc.code in (1003, 1008) and exc.reason
        return
    assert isinstance(token, str) and token
    assert since is None or (type(since) is int and 0 <= since < 2**62)


@given(since_values)
@example("١٢٣")
@example("１２")
@example("²")
def test_since_is_a_whole_number_in_ascii_digits_or_none(value: object) -> None:
    since = nonneg_int(value)
    assert since is None or (type(since) is int and 0 <= since < 2**62)
    if isinstance(value, str) and since is not None:
        assert value.isascii() and value.isdigit()


# -- the token parser -----------------------------------------------------------------------------------


@given(st.text(max_size=300))
def test_any_string_is_a_principal_or_an_auth_error(token: str) -> None:
    check_token(token)


@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_any_base64url_segments_are_refused(parts: list[bytes]) -> None:
    check_token(".".join(b64(p) for p in parts))


@given(header_dicts, claim_dicts)
@example({"alg": ["HS256"]}, {"role": "service_role", "exp": 2**40})
@example({"alg": "HS256", "kid": 7}, {"role": "service_role", "exp": 2**40})
@example({"alg": "HS256"}, {"role": "service_role", "exp": 10**400})
def test_any_header_and_claims_signed_with_the_secret(header: dict[str, Any], claims: dict[str, Any]) -> None:
    check_token(sign(b64(json.dumps(header).encode()), b64(json.dumps(claims).encode())))


@given(json_values, json_values)
def test_any_json_as_header_and_claims_signed_with_the_secret(header: Any, claims: Any) -> None:
    check_token(sign(b64(json.dumps(header).encode()), b64(json.dumps(claims).encode())))


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_any_bytes_as_header_and_claims_signed_with_the_secret(header: bytes, claims: bytes) -> None:
    check_token(sign(b64(header), b64(claims)))


def test_a_good_token_passes_the_same_check() -> None:
    sub = str(uuid.uuid4())
    claims = {"role": "authenticated", "sub": sub, "aud": "authenticated", "exp": int(time.time()) + 60}
    token = sign(b64(b'{"alg":"HS256","typ":"JWT"}'), b64(json.dumps(claims).encode()))
    assert AUTH.verify(token).user_id == uuid.UUID(sub)
