"""Fan-out: job events from the database to every client, in seq order, nobody waiting on the slowest.

The listener's NOTIFY only wakes the pump, which reads ``reactor.events`` after the last seq it
holds (seq is gapless and committed in order, so that read is exact) into a ring of the last
``max_lag`` events and writes them out in rounds, paced so that writing takes at most
``fanout_share`` of the event loop (events arriving meanwhile go out together in the next round).
A client that keeps up (its write buffer below ``write_buffer_bytes``) gets the round's frames in
one write, serialised once for all; one that falls behind is served by its own task from the ring
(reactor/web/session.py) with ordinary backpressured sends, and is closed with 1013 "too slow" once
the ring no longer holds the next event it needs. Stats (admins), queue positions (users) and
heartbeats are coalesced and go out the same way.

With no client connected there is nobody to write to, and the pump does not read or serialise the
events: each round (at most every ``idle_interval_s``) reads how far the log goes and, of the events
up to there, only those this reactor's metrics count (its own starts and ends: ``feed_follow``), and
moves the ring's end there with nothing held. A client that connects then reads the events it
needs from the database, as any client resuming from further back than the ring holds; the first
client ends the pause, and from the next round on the pump reads and sends every event again.

Nor does a pump with no client hear of other reactors' cycles that give nobody work: those come on
``reactor_log`` (migration 0017), which the listener follows only while there are clients
(:attr:`FanOut.on_clients`). Its rounds follow the notices on ``reactor_events``, its own reactor's
cycles and each heartbeat, so its end of the log (``reactor_feed_seq``) may lag by a heartbeat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from websockets.protocol import State

from reactor.core.backoff import Backoff
from reactor.core.errors import DatabaseError
from reactor.db.feed import FeedStore
from reactor.web import wire
from reactor.web.client import Client
from reactor.web.metrics import Metrics
from reactor.web.protocol import TRY_LATER
from reactor.web.settings import FeedSettings
from reactor.web.wire import Entry

__all__ = ["READ_CHUNK", "FanOut", "Ring", "track_queue"]

logger = logging.getLogger(__name__)

NO_LIMIT = 2**62
#: events read from the database at once
READ_CHUNK = 1000
#: with no client, seqs followed in one read at most
FOLLOW_SPAN = 10_000


class Ring:
    """The last ``capacity`` events, by seq (contiguous): seq s is held when base < s <= last."""

    def __init__(self, capacity: int, base: int) -> None:
        self.capacity = capacity
        self._slots: list[Entry | None] = [None] * capacity
        self.base = base
        self.last = base

    def reset(self, base: int) -> None:
        self._slots = [None] * self.capacity
        self.base = self.last = base

    def append(self, entry: Entry) -> None:
        assert entry.seq == self.last + 1
        self._slots[entry.seq % self.capacity] = entry
        self.last = entry.seq
        if self.last - self.base > self.capacity:
            self.base = self.last - self.capacity

    def get(self, seq: int) -> Entry | None:
        if self.base < seq <= self.last:
            return self._slots[seq % self.capacity]
        return None

    def skip_to(self, seq: int) -> None:
        """The log was followed up to ``seq`` without keeping its events: hold none (the slots are
        left as they are; nothing outside ``(base, last]`` is read)."""
        assert seq >= self.last
        self.base = self.last = seq


def track_queue(c: Client, row: Mapping[str, Any]) -> None:
    """A user's event that moves the queue (:func:`wire.moves_queue`): which of its jobs are queued."""
    if row["status"] == "queued":
        c.queued.setdefault(row["job_id"], None)
    else:
        c.queued.pop(row["job_id"], None)


class FanOut:
    """The ring of recent events, the clients registered to receive them, and the loops that write."""

    def __init__(self, settings: FeedSettings, store: FeedStore, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.ring = Ring(settings.max_lag, 0)
        self.clients: set[Client] = set()
        self.users: dict[UUID, set[Client]] = {}
        #: called when the log cannot be followed and every client resyncs (cached snapshots are stale)
        self.on_reset: Callable[[], None] = lambda: None
        #: called with True when the first client registers, False when the last one leaves (and at
        #: start): while there are clients, every event must wake the pump (the listener follows
        #: reactor_log too)
        self.on_clients: Callable[[bool], None] = lambda serving: None
        self._pump_wake = anyio.Event()
        self._client_came = anyio.Event()  # ends the pump's idle pause
        self._stats_wake = anyio.Event()
        self._positions_wake = anyio.Event()
        self._check_reset = False
        self._reset_reason: str | None = None
        self._next_round = 0.0  # monotonic time before which the pump does not start a round
        self.delivered = 0  # the pump has written (or handed to clients' tasks) every event up to here

    def follow_from(self, last_seq: int) -> None:
        """Events after ``last_seq`` are the ones to send (the log's end when the feed starts)."""
        self.ring.reset(last_seq)
        self.delivered = self.ring.last

    def start(self, tg: TaskGroup) -> None:
        """The pump and the coalescing loops, in ``tg``."""
        self.on_clients(bool(self.clients))
        tg.start_soon(self._pump)
        tg.start_soon(self._stats_loop)
        tg.start_soon(self._positions_loop)
        tg.start_soon(self._heartbeat_loop)

    # -- wake-ups ----------------------------------------------------------------------------------

    def wake_pump(self) -> None:
        """Something may have been committed: read the log."""
        self._pump_wake.set()

    def wake_stats(self) -> None:
        self._stats_wake.set()

    def wake_positions(self) -> None:
        self._positions_wake.set()

    def recheck(self) -> None:
        """The listener (re)connected: read whatever was committed meanwhile, and check the log did
        not restart (another database, a restore)."""
        self._check_reset = True
        self._pump_wake.set()

    def resync_all(self, reason: str) -> None:
        """Start over from the log's end, and resync every client (jobs were truncated)."""
        self._reset_reason = reason
        self._pump_wake.set()

    def to_admins(self, payload: bytes) -> None:
        """A message for every admin that keeps up (one behind misses it: the dashboard re-reads
        the same state with a ``status`` request at each heartbeat)."""
        data = wire.frame(payload)
        for c in list(self.clients):
            if c.admin and not c.lagging:
                self.write_now(c, data)

    # -- clients -------------------------------------------------------------------------------------

    def register(self, c: Client) -> None:
        c.catchup_until = max(c.cursor, self.ring.last)
        c.lagging = True
        first = not self.clients
        self.clients.add(c)
        if not c.admin and c.user_id is not None:
            self.users.setdefault(c.user_id, set()).add(c)
        self._count_clients()
        if first:
            self.on_clients(True)
        c.poke()
        self._client_came.set()

    def unregister(self, c: Client) -> None:
        if c in self.clients:
            self.clients.discard(c)
            if c.user_id is not None and not c.admin:
                mates = self.users.get(c.user_id)
                if mates is not None:
                    mates.discard(c)
                    if not mates:
                        del self.users[c.user_id]
            self._count_clients()
            if not self.clients:
                self.on_clients(False)

    def _count_clients(self) -> None:
        users = sum(len(mates) for mates in self.users.values())
        self.metrics.feed_clients.labels("admin").set(len(self.clients) - users)
        self.metrics.feed_clients.labels("user").set(users)


    def lag(self, c: Client) -> None:
        c.lagging = True
        c.poke()

    def write_now(self, c: Client, data: bytes) -> bool:
        """Write frames at once if the client keeps up; False if it must catch up on its own.

        Whole frames go straight to the transport: websockets writes its own frames (pings, close)
        whole and synchronously too, so the stream stays well formed, and compression is off.
        """
        ws = c.ws
        if c.closed or ws.protocol.state is not State.OPEN:
            return False
        transport = ws.transport
        if transport.get_write_buffer_size() > self.settings.write_buffer_bytes:
            return False
        transport.write(data)
        return True

    # -- the pump: events from the database to every client ------------------------------------

    async def _pump(self) -> None:
        retry = Backoff(base=0.1, cap=5.0)
        while True:
            await self._pump_wake.wait()
            self._pump_wake = anyio.Event()
            delay = self._next_round - time.monotonic()
            if delay > 0:
                if self.clients:
                    await anyio.sleep(delay)
                else:
                    self._client_came = anyio.Event()
                    with anyio.move_on_after(delay):
                        await self._client_came.wait()
            started = time.monotonic()
            serving = bool(self.clients)
            rows: list[dict[str, Any]] = []
            more = False
            try:
                if self._check_reset:
                    self._check_reset = False
                    await self._check_database()
                if self._reset_reason is not None:
                    reason, self._reset_reason = self._reset_reason, None
                    [b] = await self.store.rows("feed_bounds")
                    self._reset(int(b["last_seq"]), reason)
                if serving:
                    rows = await self.store.rows("feed_events", {
                        "after": self.ring.last, "upto": NO_LIMIT, "limit": READ_CHUNK, "user_id": None,
                    })
                    more = len(rows) == READ_CHUNK
                else:
                    more = await self._follow()
            except DatabaseError as exc:
                delay = retry.delay()
                logger.warning("feed cannot read events (retry in %.1f s): %s", delay, exc)
                await anyio.sleep(delay)
                self._pump_wake.set()
                continue
            retry.reset()
            if not serving:
                self._next_round = started + self.settings.idle_interval_s
            elif rows:
                if rows[0]["seq"] != self.ring.last + 1:
                    self._reset(int(rows[0]["seq"]) - 1, "events are missing")
                entries = self._ingest(rows)
                cpu = time.thread_time()
                await self._fan_out(entries)
                self.delivered = entries[-1].seq
                # pace by the CPU the round cost, not its wall time: a round the OS preempted must not
                # push the next one further back
                spent = time.thread_time() - cpu
                s = self.settings
                self._next_round = started + max(s.flush_interval_s, spent / s.fanout_share)
            if more:
                self._pump_wake.set()

    async def _follow(self) -> bool:
        """A round with no client: move the ring's end to the log's (``feed_follow``), counting this
        reactor's own events in its metrics, and serialising nothing. True if the log goes further."""
        after = self.ring.last
        rows = await self.store.rows("feed_follow", {
            "after": after, "span": FOLLOW_SPAN, "actors": list(self.metrics.actors),
        })
        upto = int(rows[0]["upto"])
        if upto < after:
            self._reset(upto, "the event log restarted")
            return False
        for row in rows:
            if row["seq"] is not None:
                self.metrics.observe_event(row)
        if upto > after:
            self.ring.skip_to(upto)
            self.delivered = upto
            # a client that connected during this read reads what was skipped from the database, as
            # one resuming from further back than the ring holds
            for c in list(self.clients):
                if c.cursor < upto:
                    c.catchup_until = max(c.catchup_until, upto)
                    self.lag(c)
        return upto == after + FOLLOW_SPAN

    async def _check_database(self) -> None:
        [b] = await self.store.rows("feed_bounds")
        if int(b["last_seq"]) < self.ring.last:
            self._reset(int(b["last_seq"]), "the event log restarted")

    def _reset(self, base: int, reason: str) -> None:
        """The log cannot be followed from where we are: start over, and resync every client."""
        logger.warning("feed resync: %s", reason, extra={"seq": base})
        self.ring.reset(base)
        self.delivered = base
        self.on_reset()
        for c in self.clients:
            c.resync = reason
            self.lag(c)

    def _ingest(self, rows: list[dict[str, Any]]) -> list[Entry]:
        entries = []
        queue_moved = False
        ring = self.ring
        base_before = ring.base
        for row in rows:
            self.metrics.observe_event(row)
            entry = wire.entry(row)
            ring.append(entry)
            entries.append(entry)
            if wire.moves_queue(row):
                queue_moved = True
                uid = entry.user_id
                if uid is not None and uid in self.users:
                    for c in self.users[uid]:
                        track_queue(c, row)
        self._stats_wake.set()
        if queue_moved:
            self._positions_wake.set()
        if ring.base != base_before:
            for c in list(self.clients):
                if c.lagging and c.cursor < ring.base and c.cursor >= c.catchup_until:
                    c.close(TRY_LATER, "too slow", "too_slow")
        return entries

    async def _fan_out(self, entries: list[Entry]) -> None:
        """One round: each client that keeps up gets its frames of these events in one write."""
        first, last = entries[0].seq, entries[-1].seq
        admin_frames = b"".join(wire.frame(e.admin) for e in entries)  # serialised once for every admin
        by_user: dict[UUID, list[Entry]] = {}
        for e in entries:
            if e.user_id is not None and e.user_id in self.users:
                by_user.setdefault(e.user_id, []).append(e)
        user_frames: dict[UUID, bytes] = {}
        limit, is_open, before = self.settings.write_buffer_bytes, State.OPEN, first - 1
        for i, c in enumerate(list(self.clients)):
            if i & 63 == 63:
                await anyio.lowlevel.checkpoint()  # a long round must not hold up the reactor's other tasks
            if c.lagging or c.closed:
                continue
            if c.cursor != before:
                if c.cursor < last:
                    self.lag(c)  # not where this round starts: its own task sorts it out
                continue
            if c.is_admin:
                data = admin_frames
            else:
                uid = c.user_id
                mine = by_user.get(uid) if uid is not None else None
                if not mine or uid is None:
                    c.cursor = last
                    continue
                if uid not in user_frames:
                    user_frames[uid] = b"".join(wire.frame(e.user) for e in mine if e.user is not None)
                data = user_frames[uid]
            # _write_now, inlined: this loop runs once per client per round
            transport = c.transport
            if c.protocol.state is is_open and transport.get_write_buffer_size() <= limit:
                transport.write(data)
                c.cursor = last
            else:
                self.lag(c)

    # -- coalesced messages --------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        while True:
            await self._stats_wake.wait()
            self._stats_wake = anyio.Event()
            if not any(c.admin for c in self.clients):
                continue
            started = time.monotonic()
            try:
                [stats] = await self.store.rows("feed_stats")
            except DatabaseError as exc:
                logger.debug("feed cannot read stats: %s", exc)
                await anyio.sleep(self.settings.stats_interval_s)
                continue
            spent = time.monotonic() - started  # the read's wall time (its cost to the database)
            # figures as of seq N go out after the events up to N (give the pump a moment)
            with anyio.move_on_after(2.0):
                while self.delivered < stats["last_seq"]:
                    self._pump_wake.set()
                    await anyio.sleep(self.settings.flush_interval_s)
            payload = wire.dumps({"type": "stats", "seq": stats["last_seq"], "stats": stats})
            frame = wire.frame(payload)
            for c in list(self.clients):
                if c.admin and not self.offer(c, frame):
                    c.pending_stats = payload
            s = self.settings
            await anyio.sleep(max(s.stats_interval_s, spent / s.stats_share))

    async def _positions_loop(self) -> None:
        while True:
            await self._positions_wake.wait()
            self._positions_wake = anyio.Event()
            watching = [c for c in self.clients if c.queued]
            ids = list({job_id for c in watching for job_id in c.queued})
            if ids:
                try:
                    rows = await self.store.rows("feed_positions", {"ids": ids})
                except DatabaseError as exc:
                    logger.debug("feed cannot read positions: %s", exc)
                    rows = None
                if rows is not None:
                    positions = {r["id"]: int(r["queue_position"]) for r in rows}
                    for c in watching:
                        self._update_positions(c, positions)
            await anyio.sleep(self.settings.position_interval_s)

    def _update_positions(self, c: Client, positions: Mapping[UUID, int]) -> None:
        for job_id, sent in list(c.queued.items()):
            now = positions.get(job_id)
            if now is None:
                del c.queued[job_id]  # no longer queued: its event says so
                continue
            if now != sent:
                c.queued[job_id] = now

                if not self.offer(c, wire.frame(wire.position(job_id, now))):
                    c.pending_positions[job_id] = now

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            self._pump_wake.set()  # and a look at the table, in case a wake-up was lost
            frames: dict[int, bytes] = {}
            for c in list(self.clients):
                if c.cursor not in frames:
                    frames[c.cursor] = wire.frame(wire.heartbeat(c.cursor))
                if not self.offer(c, frames[c.cursor]):
                    c.pending_heartbeat = True

    def offer(self, c: Client, frame: bytes) -> bool:
        """Write a frame now if the client keeps up; False (and its task woken) if it must wait."""
        if c.closed:
            return True
        if not c.lagging and self.write_now(c, frame):
            return True
        self.lag(c)
        return False
