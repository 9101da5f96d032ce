"""The LISTEN connection (reactor/db/listen.py): every notification handed on once and in order, in
bursts, while it was not yet consuming, and while its idle check runs; a quiet connection probed; a
lost one, or a subscriber that fails, ends ``consume``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest

from reactor.core.errors import DatabaseUnavailable
from reactor.db.listen import ListenConnection
from reactor.engine.listener import Listener

pytestmark = pytest.mark.anyio

Conn = psycopg.Connection[Any]

WAIT = 15.0  # seconds for what must happen (a shared machine may be slow)


def notify(db: Conn, seqs: range) -> None:
    for seq in seqs:
        db.execute("SELECT pg_notify('reactor_events', %s)", (json.dumps({"seq": seq}),))


async def until(check: Callable[[], bool], what: str) -> None:
    with anyio.move_on_after(WAIT):
        while not check():
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def consume_until_it_fails(conn: ListenConnection, on_notify: Callable[[str, str], None],
                                 then: Callable[[], None]) -> BaseException:
    """Run ``consume``, call ``then`` once it runs, and return what ends it."""
    ended: list[BaseException] = []

    async def consume() -> None:
        try:
            await conn.consume(on_notify, 60.0)
        except Exception as exc:
            ended.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.1)
        then()
        await until(lambda: bool(ended), "consume to end")
    return ended[0]


async def test_every_notification_once_and_in_order_also_during_idle_checks(dsn: str, db: Conn) -> None:
    got: list[tuple[str, int]] = []

    def on_notify(channel: str, payload: str) -> None:
        got.append((channel, json.loads(payload)["seq"]))

    async with await ListenConnection.connect(dsn) as conn:
        await conn.listen(["reactor_events", "reactor_config"])
        pid = conn.backend_pid
        notify(db, range(0, 3))  # before it consumes: they wait in the socket
        await anyio.sleep(0.1)
        async with anyio.create_task_group() as tg:
            # an idle check every 20 ms of quiet: notifications arrive while it runs too
            tg.start_soon(conn.consume, on_notify, 0.02)
            sent = 3
            for burst in range(20):
                notify(db, range(sent, sent + 25 * (burst % 3)))
                sent += 25 * (burst % 3)
                await anyio.sleep(0.03 * (burst % 2))
            db.execute("NOTIFY reactor_config, '{\"seq\": -1}'")
            await until(lambda: len(got) == sent + 1, f"{sent + 1} notifications")
            await anyio.sleep(0.2)  # quiet: probed, and nothing more comes
            last_query = db.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            tg.cancel_scope.cancel()
    assert got == [("reactor_events", s) for s in range(sent)] + [("reactor_config", -1)]
    assert last_query == ("SELECT 1",)  # the idle check ran


async def test_a_lost_connection_ends_consume_as_unavailable(dsn: str, db: Conn) -> None:
    async with await ListenConnection.connect(dsn) as conn:
        await conn.listen(["reactor_events"])
        pid = conn.backend_pid

        def terminate() -> None:
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))

        ended = await consume_until_it_fails(conn, lambda c, p: None, terminate)
    assert isinstance(ended, DatabaseUnavailable), repr(ended)


async def test_a_failing_subscriber_ends_consume_with_its_error(dsn: str, db: Conn) -> None:
    seen: list[str] = []

    def on_notify(channel: str, payload: str) -> None:
        seen.append(payload)
        if json.loads(payload)["seq"] == 2:
            raise RuntimeError("subscriber broke")

    async with await ListenConnection.connect(dsn) as conn:
        await conn.listen(["reactor_events"])
        ended = await consume_until_it_fails(conn, on_notify, lambda: notify(db, range(0, 5)))
    assert isinstance(ended, RuntimeError) and str(ended) == "subscriber broke", repr(ended)
    assert [json.loads(p)["seq"] for p in seen][:3] == [0, 1, 2]


async def test_the_listener_follows_reactor_log_only_while_asked_and_again_after_a_reconnect(
        dsn: str, db: Conn) -> None:
    got: list[tuple[str, int | None]] = []
    followed: list[bool] = []  # on_log calls: each time the LISTEN on reactor_log went live
    listener = Listener(dsn, on_notice=lambda n: got.append((n.channel, n.seq)), on_connect=lambda: None,
                        on_log=lambda: followed.append(listener.following_log), max_backoff_s=0.2)

    async def heard_log(seq: int) -> bool:
        """NOTIFY reactor_log, then reactor_events (delivered in that order): was the first heard?"""
        for channel in ("reactor_log", "reactor_events"):
            db.execute("SELECT pg_notify(%s, %s)", (channel, json.dumps({"seq": seq})))
        await until(lambda: ("reactor_events", seq) in got, f"the marker {seq}")
        return ("reactor_log", seq) in got

    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        assert not await heard_log(1)  # not asked: not followed

        listener.follow_log(True)
        await until(lambda: listener.following_log and followed == [True], "the LISTEN on reactor_log")
        assert await heard_log(2)

        # a reconnect LISTENs on it again, and says so again
        db.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
        await until(lambda: listener.reconnects == 1 and followed == [True, True], "a reconnect")
        assert await heard_log(3)

        listener.follow_log(False)
        await until(lambda: not listener.following_log, "the UNLISTEN")
        assert not await heard_log(4)
        # asked and unasked at once: nothing changes, nothing is missed
        listener.follow_log(True)
        listener.follow_log(False)
        assert not await heard_log(5)
        tg.cancel_scope.cancel()
    assert [s for c, s in got if c == "reactor_events"] == [1, 2, 3, 4, 5]
    assert [s for c, s in got if c == "reactor_log"] == [2, 3]
