"""Schedules in SQL (migration 0011): fire_schedules(p_now) with an injected clock, from one session
and from many at once; catch_up; {{date}} and {{slot}}; what the system keeps; run-now; NOTIFY.

Everything here is what psql alone can do: INSERT a schedule, read next_run_at, call
reactor.fire_schedules() (the reactor's own call), read the jobs it made.
"""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

Conn = psycopg.Connection[Any]


def add(db: Conn, name: str = "s", cron: str = "* * * * *", **cols: Any) -> dict[str, Any]:
    cols = {"name": name, "cron": cron, "job_type": "daily_ca", "payload": '{"date": "{{date}}"}', **cols}
    names = ", ".join(cols)  # the test's own column names, never user input
    marks = ", ".join(["%s"] * len(cols))
    with db.cursor(row_factory=dict_row) as cur:
        cur.execute(f"INSERT INTO job_schedules ({names}) VALUES ({marks}) RETURNING *",
                    list(cols.values()))
        row = cur.fetchone()
    assert row is not None
    return row


def schedule(db: Conn, name: str = "s") -> dict[str, Any]:
    with db.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM job_schedules WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return row


def fire(db: Conn, now: datetime) -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM reactor.fire_schedules(%s)", (now,)).fetchall()


def jobs(db: Conn, name: str = "s") -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM jobs WHERE schedule_name = %s ORDER BY idempotency_key",
                           (name,)).fetchall()


def key(name: str, slot: datetime) -> str:
    return f"schedule:{name}:{slot.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def test_a_due_slot_makes_one_job_that_carries_the_schedule_and_its_key(db: Conn) -> None:
    s = add(db)
    first = s["next_run_at"]
    assert first.second == 0 and s["last_run_at"] is None
    assert fire(db, first - timedelta(seconds=1)) == []
    made = fire(db, first + timedelta(seconds=1))
    assert [(r["schedule_name"], r["slot"], r["fired"]) for r in made] == [("s", first, True)]
    (job,) = jobs(db)
    assert job["id"] == made[0]["job_id"]
    assert job["idempotency_key"] == key("s", first)
    assert job["status"] == "queued" and job["job_type"] == "daily_ca" and job["priority"] == "medium"
    after = schedule(db)
    assert after["last_run_at"] == first
    assert after["next_run_at"] == first + timedelta(minutes=1)
    assert after["jobs_created"] == 1
    assert fire(db, first + timedelta(seconds=2)) == []  # the slot is done


@pytest.mark.parametrize(("catch_up", "grace_s", "slots_run", "skipped"), [
    ("all", 60, [0, 1, 2, 3, 4], 0),   # every missed slot, oldest first
    ("latest", 60, [4], 4),            # only the newest
    ("latest", 20, [4], 4),            # however late
    ("none", 60, [4], 4),              # the newest is 30 s old: on time (grace 1 min)
    ("none", 20, [], 5),               # with a grace of 20 s it was missed too
])
def test_catch_up_after_the_reactors_were_down(db: Conn, catch_up: str, grace_s: int, slots_run: list[int],
                                               skipped: int) -> None:
    """Slots 0-4 passed while no reactor ran; the first call comes 30 s after slot 4."""
    first = add(db, catch_up=catch_up)["next_run_at"]
    db.execute("SELECT count(*) FROM reactor.fire_schedules(%s, make_interval(secs => %s))",
               (first + timedelta(minutes=4, seconds=30), grace_s))
    assert [j["idempotency_key"] for j in jobs(db)] == [key("s", first + timedelta(minutes=i)) for i in slots_run]
    after = schedule(db)
    assert after["next_run_at"] == first + timedelta(minutes=5)
    assert after["slots_skipped"] == skipped
    assert after["jobs_created"] == len(slots_run)
    # and the next slot, on time, runs as usual whatever catch_up says
    fire(db, first + timedelta(minutes=5, seconds=1))
    assert jobs(db)[-1]["idempotency_key"] == key("s", first + timedelta(minutes=5))


def test_catch_up_all_goes_on_in_the_next_call_past_its_bound(db: Conn) -> None:
    first = add(db, catch_up="all")["next_run_at"]
    now = first + timedelta(minutes=30)
    rows = db.execute("SELECT count(*) FROM reactor.fire_schedules(%s, '1 minute', 10)", (now,)).fetchone()
    assert rows == (10,)
    assert schedule(db)["next_run_at"] == first + timedelta(minutes=10)
    db.execute("SELECT count(*) FROM reactor.fire_schedules(%s, '1 minute', 100)", (now,))
    assert len(jobs(db)) == 31


def test_latest_finds_the_newest_slot_after_a_long_outage(db: Conn) -> None:
    first = add(db, cron="0 * * * *", catch_up="latest")["next_run_at"]
    now = first + timedelta(days=40, minutes=5)
    (made,) = fire(db, now)
    assert made["slot"] == first + timedelta(days=40)
    assert schedule(db)["next_run_at"] == first + timedelta(days=40, hours=1)
    assert schedule(db)["slots_skipped"] == 40 * 24


def test_date_in_kolkata_right_across_utc_midnight(db: Conn) -> None:
    """Asia/Kolkata is UTC+5:30: its midnight is 18:30 UTC, so {{date}} turns there, not at 00:00 UTC."""
    add(db, cron="*/30 * * * *", timezone="Asia/Kolkata", catch_up="all",
        payload='{"date": "{{date}}", "title": "Digest {{date}}", '
                '"meta": {"slot": "{{slot}}", "n": 1, "l": ["{{date}}"]}}')
    now = db.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    midnight_ist = now.astimezone(UTC).replace(hour=18, minute=30, second=0, microsecond=0)
    # the first slot looked at is 23:30 IST, half an hour before: it must come after the schedule was
    # made (run between 18:00 and 18:30 UTC, the test once looked for a slot from before it)
    if midnight_ist - timedelta(minutes=30) <= now:
        midnight_ist += timedelta(days=1)
    fire(db, midnight_ist + timedelta(minutes=31))
    by_slot = {j["idempotency_key"]: j["payload"] for j in jobs(db)}
    before = midnight_ist - timedelta(minutes=30)   # 23:30 IST: still the UTC date of the slot
    after = midnight_ist + timedelta(minutes=30)    # 00:30 IST: the next day, still before UTC midnight
    day = before.date().isoformat()
    next_day = (before.date() + timedelta(days=1)).isoformat()
    assert by_slot[key("s", before)]["date"] == day
    assert by_slot[key("s", midnight_ist)]["date"] == next_day
    assert by_slot[key("s", after)]["date"] == next_day
    assert after.date().isoformat() == day  # UTC has not turned yet
    assert by_slot[key("s", midnight_ist)] == {
        "date": next_day, "title": f"Digest {next_day}",
        "meta": {"slot": key("s", midnight_ist).removeprefix("schedule:s:"), "n": 1, "l": [next_day]},
    }


def test_next_and_last_run_are_kept_by_the_system(db: Conn) -> None:
    add(db)
    for col in ("next_run_at", "last_run_at"):
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            db.execute(f"UPDATE job_schedules SET {col} = now() + interval '1 day'")
        assert err.value.diag.column_name == col
        assert "kept by the system" in str(err.value)
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        db.execute("INSERT INTO job_schedules (name, cron, job_type, next_run_at) "
                   "VALUES ('t', '* * * * *', 'daily_ca', now())")
    assert err.value.diag.column_name == "next_run_at"


@pytest.mark.parametrize(("col", "value"), [
    ("priority", "urgent"), ("catch_up", "some"), ("job_type", "video"), ("payload", '[1]'),
    ("name", "a:b"), ("payload", '{"date": {"x": 1}}'),
])
def test_bad_values_are_refused_naming_the_column(db: Conn, col: str, value: str) -> None:
    cols = {"name": "s", "cron": "* * * * *", "job_type": "daily_ca", col: value}
    with pytest.raises(psycopg.errors.IntegrityError) as err:
        add(db, **cols)
    assert err.value.diag.column_name == col


def test_disable_and_enable(db: Conn) -> None:
    first = add(db)["next_run_at"]
    db.execute("UPDATE job_schedules SET enabled = false WHERE name = 's'")
    assert schedule(db)["next_run_at"] is None
    assert fire(db, first + timedelta(hours=1)) == []
    db.execute("UPDATE job_schedules SET enabled = true WHERE name = 's'")
    nxt = schedule(db)["next_run_at"]
    now = db.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    assert now < nxt <= now + timedelta(minutes=1)  # from now: what passed while disabled is not caught up


def test_changing_cron_or_timezone_moves_the_next_run(db: Conn) -> None:
    add(db, cron="0 6 * * *")
    db.execute("UPDATE job_schedules SET timezone = 'Asia/Kolkata'")
    assert schedule(db)["next_run_at"].astimezone(UTC).strftime("%H:%M") == "00:30"
    db.execute("UPDATE job_schedules SET cron = '15 7 * * *'")
    assert schedule(db)["next_run_at"].astimezone(UTC).strftime("%H:%M") == "01:45"


def test_run_now_makes_a_job_and_keeps_the_slots(db: Conn) -> None:
    first = add(db, cron="0 0 1 1 *")["next_run_at"]
    job_id = db.execute("SELECT reactor.run_schedule_now('s')").fetchone()[0]  # type: ignore[index]
    (job,) = jobs(db)
    assert job["id"] == job_id and job["idempotency_key"].startswith("schedule:s:")
    s = schedule(db)
    assert s["next_run_at"] == first and s["last_run_at"] is not None and s["jobs_created"] == 1
    assert db.execute("SELECT reactor.run_schedule_now('nope')").fetchone() == (None,)


def test_one_job_per_slot_is_also_kept_by_an_index(db: Conn) -> None:
    first = add(db)["next_run_at"]
    fire(db, first)
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute("INSERT INTO jobs (job_type, schedule_name, idempotency_key) VALUES ('daily_ca', 's', %s)",
                   (key("s", first),))


def test_schedule_changes_notify_the_reactors_but_firing_does_not(db: Conn, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN reactor_schedules")
        listener.execute("LISTEN reactor_due")
        first = add(db)["next_run_at"]
        got = [n.channel for n in listener.notifies(timeout=1.0, stop_after=1)]
        assert got == ["reactor_schedules"]
        fire(db, first)
        assert [n.channel for n in listener.notifies(timeout=0.5)] == []
        db.execute("INSERT INTO jobs (job_type, run_after) VALUES ('daily_ca', now() + interval '1 hour')")
        assert [n.channel for n in listener.notifies(timeout=1.0, stop_after=1)] == ["reactor_due"]
        db.execute("INSERT INTO jobs (job_type) VALUES ('daily_ca')")  # not delayed: no reactor_due
        assert [n.channel for n in listener.notifies(timeout=0.5)] == []


def test_many_sessions_with_skewed_clocks_make_exactly_one_job_per_slot(dsn: str, db: Conn) -> None:
    """Six sessions fire a `* * * * *` schedule through five simulated minutes, each with its own
    clock (up to 20 s off, never past the minute), all at once; some die mid-transaction (their
    work is rolled back): every slot makes one job, and none makes two."""
    for name, catch_up in (("every", "all"), ("newest", "latest"), ("ontime", "none")):
        add(db, name=name, catch_up=catch_up)
    first = schedule(db, "every")["next_run_at"]
    rounds = [first + timedelta(minutes=m, seconds=s) for m in range(5) for s in (1, 10, 20, 30, 39)]
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def session(seed: int) -> None:
        rng = random.Random(seed)
        try:
            conn = psycopg.connect(dsn)
            for at in rounds:
                barrier.wait(timeout=30)
                skew = timedelta(seconds=rng.uniform(-20, 20))
                conn.execute("SELECT count(*) FROM reactor.fire_schedules(%s)", (at + skew,))
                if rng.random() < 0.1:
                    conn.close()  # killed holding its locks, before its commit: rolled back
                    conn = psycopg.connect(dsn)
                else:
                    conn.commit()
            conn.close()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=session, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    # whatever was rolled back, one more call at the end (any reactor's next wake-up) finishes it
    fire(db, rounds[-1] + timedelta(seconds=1))
    for name in ("every", "newest", "ontime"):
        keys = [j["idempotency_key"] for j in jobs(db, name)]
        assert keys == [key(name, first + timedelta(minutes=m)) for m in range(5)], name
        assert schedule(db, name)["jobs_created"] == 5
