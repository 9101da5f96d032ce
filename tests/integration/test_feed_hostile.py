"""The feed port under hostile clients: each bad input is answered cleanly (1008 or an HTTP 4xx, one
log line, no traceback) and affects only the client that sent it. A real reactor, real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import jwt
import psycopg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from reactor.core.logs import KeyValueFormatter
from reactor.ops.actions import RunbookActions
from reactor.service import ServiceSettings
from reactor.web.auth import AuthSettings
from reactor.web.feed import Feed, FeedSettings
from tests.integration.test_feed import (
    SECRET,
    USER_A,
    bearer,
    closed_with,
    events,
    feed_reactor,
    http_base,
    insert,
    recv,
    recv_until,
    token,
    url,
)

pytestmark = pytest.mark.anyio

ORCHESTRATOR = "http://127.0.0.1:9"  # nothing renders in these tests: the feed is what is tested


class _Lines(logging.Handler):
    """Each record formatted as the reactor writes it, when it is logged (reactor.core.logs' formatter: the
    one that hides secrets)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(KeyValueFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


_handlers: dict[int, _Lines] = {}


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, db: psycopg.Connection[Any]) -> Iterator[pytest.LogCaptureFixture]:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # events, and no render noise
    caplog.set_level(logging.INFO)
    handler = _Lines()
    logging.getLogger().addHandler(handler)
    _handlers[id(caplog)] = handler
    try:
        yield caplog
    finally:
        logging.getLogger().removeHandler(handler)
        del _handlers[id(caplog)]


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return _handlers[id(caplog)].lines


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "reactor.web.session" and r.msg.startswith("feed client refused")]


def assert_clean_log(caplog: pytest.LogCaptureFixture, refused: int | None = 1) -> None:
    """No traceback anywhere (the feed's, websockets' own), and ``refused`` refusal lines."""
    assert all(r.exc_info is None for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]
    assert not [line for line in lines(caplog) if "Traceback" in line or " exc=" in line]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an error was logged"
    if refused is not None:
        assert len(refusals(caplog)) == refused, [r.getMessage() for r in refusals(caplog)]


async def still_served(good: ClientConnection, db: psycopg.Connection[Any]) -> None:
    """The other client gets new events and heartbeats as before."""
    job = insert(db)
    got = await recv_until(good, lambda m: m["type"] == "event" and m["job"]["id"] == job)
    assert events(got, job)
    assert (await recv_until(good, lambda m: m["type"] == "heartbeat"))[-1]["type"] == "heartbeat"


def signed(header: bytes | dict[str, Any], body: dict[str, Any]) -> str:
    import hashlib
    import hmac

    def part(value: bytes | dict[str, Any]) -> bytes:
        return jwt.utils.base64url_encode(value if isinstance(value, bytes) else json.dumps(value).encode())

    signing_input = part(header) + b"." + part(body)
    mac = hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + jwt.utils.base64url_encode(mac)).decode()


ADMIN_CLAIMS: dict[str, Any] = {"role": "service_role", "exp": int(time.time()) + 3600}


# -- a. junk in the token's header ---------------------------------------------------------------------


@pytest.mark.parametrize(("header", "reason"), [
    ({"alg": ["HS256"], "typ": "JWT"}, "token header has no alg"),
    ({"alg": {"HS256": 1}}, "token header has no alg"),
    ({"alg": "HS256", "kid": 7}, "malformed token"),
    ({"alg": "HS256", "kid": ["a"]}, "malformed token"),
    (b'["HS256"]', "malformed token"),
    (b"{not json", "malformed token"),
])
async def test_a_token_with_a_junk_header_is_refused(
    dsn: str, db: psycopg.Connection[Any], logs: pytest.LogCaptureFixture, header: Any, reason: str,
) -> None:
    tok = signed(header, ADMIN_CLAIMS)
    async with feed_reactor(dsn, ORCHESTRATOR) as svc, connect(url(svc), additional_headers=bearer(token())) as good:
        await recv(good)
        # first message (browsers)
        async with connect(url(svc)) as bad:
            await bad.send(json.dumps({"type": "auth", "token": tok}))
            code, why, received = await closed_with(bad)
        assert (code, received) == (1008, [])
        assert reason in why or why == "malformed token"
        # Authorization header (servers)
        with pytest.raises(InvalidStatus) as info:
            async with connect(url(svc), additional_headers=bearer(tok)):
                pass
        assert info.value.response.status_code == 401
        assert info.value.response.body.startswith(b"invalid token: ")
        await still_served(good, db)
    assert_clean_log(logs, refused=2)


# -- b. messages nested deep, and numbers nobody means --------------------------------------------------


@pytest.mark.parametrize(("message", "reason"), [
    ("[" * 5000 + "]" * 3000, "malformed message: nested too deep"),  # 8 KB: under max_message_bytes
    ('{"type": "auth", "token": "x", "since": ' + "[" * 7000 + "}", "malformed message: nested too deep"),
    ('{"type": "auth", "token": "x", "since": 1e999}', "malformed message: not JSON"),
    ('{"type": "auth", "token": "x", "since": NaN}', "malformed message: not JSON"),
    ('{"type": "auth", "token": "x", "since": ' + "9" * 4000 + "}", "malformed message: not JSON"),
    ('{"type": "auth", "token": "x", "since": 1.5}', "malformed message: since must be a whole number"),
    ('{"type": "auth", "token": "\\ud800"}', "malformed message: invalid unicode"),
])
async def test_a_poison_first_message_closes_that_client_alone(
    dsn: str, db: psycopg.Connection[Any], logs: pytest.LogCaptureFixture, message: str, reason: str,
) -> None:
    assert len(message.encode()) <= FeedSettings.max_message_bytes
    async with feed_reactor(dsn, ORCHESTRATOR) as svc, connect(url(svc), additional_headers=bearer(token())) as good:
        await recv(good)
        async with connect(url(svc)) as bad:
            await bad.send(message)
            assert await closed_with(bad) == (1008, reason, [])
        await still_served(good, db)
    assert_clean_log(logs)


@pytest.mark.parametrize(("message", "reason"), [
    ('{"type": "job", "id": ' + "[" * 5000 + "}", "malformed message: nested too deep"),
    ('{"type": "job", "id": "x", "request_id": "\\udc00"}', "malformed message: invalid unicode"),
    ('{"type": "status", "request_id": -Infinity}', "malformed message: not JSON"),
    ('{"type": "action", "action": "pause", "values": 1' + "0" * 100 + "}", "malformed message: not JSON"),
])
async def test_a_poison_request_closes_that_signed_in_client_alone(
    dsn: str, db: psycopg.Connection[Any], logs: pytest.LogCaptureFixture, message: str, reason: str,
) -> None:
    async with feed_reactor(dsn, ORCHESTRATOR) as svc, connect(url(svc), additional_headers=bearer(token())) as good, \
            connect(url(svc), additional_headers=bearer(token())) as bad:
        await recv(good)
        await recv(bad)
        await bad.send(message)
        code, why, _ = await closed_with(bad)
        assert (code, why) == (1008, reason)
        await still_served(good, db)
    assert_clean_log(logs)


# -- c. since in other scripts' digits ---------------------------------------------------------------------


@pytest.mark.parametrize("since", ["١٢٣", "１２", "²", "߁", "1²"])
async def test_since_in_unicode_digits_is_malformed(
    dsn: str, db: psycopg.Connection[Any], logs: pytest.LogCaptureFixture, since: str,
) -> None:
    async with feed_reactor(dsn, ORCHESTRATOR) as svc, connect(url(svc), additional_headers=bearer(token())) as good:
        await recv(good)
        async with httpx.AsyncClient(base_url=http_base(svc)) as http:
            resp = await http.get("/feed", params={"since": since})
        assert (resp.status_code, resp.text) == (400, "since must be a whole number\n")
        async with connect(url(svc)) as bad:
            await bad.send(json.dumps({"type": "auth", "token": token(), "since": since}))
            assert await closed_with(bad) == (1008, "malformed message: since must be a whole number", [])
        await still_served(good, db)
    assert_clean_log(logs, refused=2)


# -- d. a header twice ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    [("Origin", "https://app.example"), ("Origin", "https://evil.example")],
    [("Authorization", f"Bearer {token()}"), ("Authorization", "Bearer junk")],
    [("Authorization", f"Bearer {token()}"), ("authorization", f"Bearer {token()}")],
])
async def test_a_header_twice_is_a_400(
    dsn: str, db: psycopg.Connection[Any], logs: pytest.LogCaptureFixture, headers: list[tuple[str, str]],
) -> None:
    name = headers[0][0]
    async with feed_reactor(dsn, ORCHESTRATOR, allowed_origins=("https://app.example",)) as svc, \
            connect(url(svc), additional_headers=bearer(token())) as good:
        await recv(good)
        with pytest.raises(InvalidStatus) as info:
            async with connect(url(svc), additional_headers=headers):
                pass
        assert info.value.response.status_code == 400
        assert info.value.response.body == f"more than one {name} header\n".encode()
        # one of each is still fine
        async with connect(url(svc), origin=Origin("https://app.example"), additional_headers=bearer(token())) as ok:
            assert (await recv(ok))["type"] == "snapshot"
        await still_served(good, db)
    assert_clean_log(logs)


# -- e. idle sockets cannot starve those who sign in ------------------------------------------------------------


def _enough_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def test_unauthenticated_sockets_cannot_starve_signed_in_clients(
    dsn: str, db: psycopg.Connection[Any], logs: pytest.LogCaptureFixture,
) -> None:
    max_clients, idle_ws, idle_tcp = 600, 550, 100
    _enough_files(4 * (idle_ws + idle_tcp) + 512)  # both ends of each socket are in this process
    async with feed_reactor(dsn, ORCHESTRATOR, max_clients=max_clients, auth_timeout_s=60.0) as svc:
        feed = svc.feed
        assert feed is not None and feed.port is not None
        assert feed.settings.unauthenticated_limit == 300  # the default: max(100, max_clients // 2)
        async with connect(url(svc), additional_headers=bearer(token())) as watcher:
            await recv(watcher)
            idle: list[ClientConnection] = []
            raw: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            try:
                # 650 sockets that never sign in: websockets (handshake done) and bare TCP (slowloris: not
                # even an HTTP request), more than max_clients' worth of them together
                for i in range(idle_ws + idle_tcp):
                    if i % 6 == 5:
                        raw.append(await asyncio.open_connection("127.0.0.1", feed.port))
                    else:
                        idle.append(await connect(url(svc), open_timeout=30))
                await anyio.sleep(0.2)
                assert feed.unauthenticated <= 300
                # an admin signing in with a first message, as the dashboard does: snapshot within 1 s
                started = time.monotonic()
                async with connect(url(svc)) as admin:
                    await admin.send(json.dumps({"type": "auth", "token": token()}))
                    assert (await recv(admin, timeout=1.0))["type"] == "snapshot"
                    assert time.monotonic() - started < 1.0
                    # a user with a bearer header too
                    async with connect(url(svc), additional_headers=bearer(token("authenticated", USER_A))) as user:
                        assert (await recv(user, timeout=1.0))["type"] == "snapshot"
                        assert feed.clients == 3
                # the idle ones that were pushed out were told why (the oldest first); the rest still wait
                pushed = [ws for ws in idle if ws.close_code is not None]
                assert pushed and len(idle) - len(pushed) <= 300
                assert {(ws.close_code, ws.close_reason) for ws in pushed} == {
                    (1013, "too many unauthenticated connections")}
                # and the watcher, signed in before the flood, never noticed
                await still_served(watcher, db)
            finally:
                for _, writer in raw:
                    writer.close()
                for ws in idle:
                    ws.transport.abort()
    # 1013s are load shedding, not refusals of bad input: none logged, nothing else either
    assert_clean_log(logs, refused=0)


async def test_max_clients_counts_only_signed_in_clients(dsn: str, logs: pytest.LogCaptureFixture) -> None:
    async with feed_reactor(dsn, ORCHESTRATOR, max_clients=2, max_unauthenticated=3) as svc, \
            connect(url(svc)) as w1, connect(url(svc)) as w2, connect(url(svc)) as w3, \
            connect(url(svc), additional_headers=bearer(token())) as one:
        await recv(one)
        async with connect(url(svc)) as w4:  # pushes out w1, the oldest
            code, reason, _ = await closed_with(w1)
            assert (code, reason) == (1013, "too many unauthenticated connections")
            await w2.send(json.dumps({"type": "auth", "token": token()}))
            assert (await recv(w2))["type"] == "snapshot"
            # two signed in: the next is refused (a header: 503 at the handshake; a message: 1013)
            with pytest.raises(InvalidStatus) as info:
                async with connect(url(svc), additional_headers=bearer(token())):
                    pass
            assert info.value.response.status_code == 503
            await w3.send(json.dumps({"type": "auth", "token": token()}))
            assert (await closed_with(w3))[:2] == (1013, "too many clients")
            assert w4.close_code is None  # still waiting for its turn
    assert_clean_log(logs, refused=0)


# -- f. requests beyond the rate --------------------------------------------------------------------------------


async def test_requests_beyond_the_rate_close_that_client(
    dsn: str, db: psycopg.Connection[Any], logs: pytest.LogCaptureFixture,
) -> None:
    async with feed_reactor(dsn, ORCHESTRATOR) as svc, connect(url(svc), additional_headers=bearer(token())) as good, \
            connect(url(svc), additional_headers=bearer(token())) as greedy:
        await recv(good)
        await recv(greedy)
        assert svc.feed is not None and (svc.feed.settings.request_rate, svc.feed.settings.request_burst) == (20, 40)
        # within the burst: every request answered
        for i in range(30):
            await greedy.send(json.dumps({"type": "job", "id": "nope", "request_id": i}))
        answers = await recv_until(greedy, lambda m: m.get("request_id") == 29)
        assert len([m for m in answers if m["type"] == "job"]) == 30
        # 200 at once: well past 40 plus 20 a second
        for i in range(200):
            try:
                await greedy.send(json.dumps({"type": "job", "id": "nope", "request_id": 100 + i}))
            except ConnectionClosed:
                break
        code, reason, got = await closed_with(greedy)
        assert (code, reason) == (1008, "too many requests")
        assert 0 < len([m for m in map(json.loads, got) if m["type"] == "job"]) < 200
        await still_served(good, db)
    assert_clean_log(logs)


# -- g. secrets in reprs, log lines and errors ---------------------------------------------------------------


PASSWORD = "s3cr@t-pw"  # with an "@": a DSN parser that stops at the first one shows the rest


async def test_secrets_stay_out_of_reprs_logs_and_answers(
    dsn: str, db: psycopg.Connection[Any], logs: pytest.LogCaptureFixture,
) -> None:
    info = db.info
    # a key=value DSN with a password (the test cluster trusts local connections, so it connects)
    kv_dsn = f"host={info.host} port={info.port} user={info.user} dbname={info.dbname} password={PASSWORD}"
    feed_settings = FeedSettings(auth=AuthSettings(jwt_secret=SECRET))
    for settings in (feed_settings, feed_settings.auth):
        assert SECRET not in repr(settings) and SECRET not in str(settings)
    async with feed_reactor(kv_dsn, ORCHESTRATOR) as svc, httpx.AsyncClient(base_url=http_base(svc)) as http:
        assert (await http.get("/readyz")).status_code == 200
        async with connect(url(svc)) as bad:
            await bad.send(json.dumps({"type": "auth", "token": jwt.encode(
                {"role": "service_role", "exp": int(time.time()) + 60}, "wrong-secret-0123456789abcdefghijkl",
                algorithm="HS256")}))
            assert (await closed_with(bad))[:2] == (1008, "bad signature")
        # a failed connection, logged: the URL form, where libpq reads the host as "t-pw@127.0.0.1"
        url_dsn = f"postgresql://{info.user}:{PASSWORD}@127.0.0.1:{info.port}/{info.dbname}"
        Feed(replace_dsn(svc.settings), url_dsn)  # a feed for this DSN: its password is a secret from now on
        answer = await anyio.to_thread.run_sync(RunbookActions(url_dsn).run, "pause", None, {}, "admin:test")
        assert answer == {"error": "database unavailable"}
        with pytest.raises(psycopg.Error) as failed:
            psycopg.connect(url_dsn, connect_timeout=2)
        assert "t-pw@" in str(failed.value)  # what libpq says, and what must not reach a log or an answer
    text = "\n".join(lines(logs))
    assert "cannot connect" in text  # the failed connection was logged...
    for secret in (PASSWORD, "t-pw@", SECRET):
        assert secret not in text  # ...without the password, whole or in part
    assert_clean_log(logs, refused=1)


def replace_dsn(settings: ServiceSettings) -> FeedSettings:
    assert settings.feed is not None
    return settings.feed


def test_service_settings_repr_hides_the_dsn_password() -> None:
    settings = ServiceSettings(dsn=f"postgresql://u:{PASSWORD}@db.example/app",
                               orchestrator_url=f"http://render:{PASSWORD}@orchestrator:8000")
    assert PASSWORD not in repr(settings)
