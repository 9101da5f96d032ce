"""Cron in the database (migration 0011): reactor.cron_next() against cronsim, the oracle.

cronsim (by the author of healthchecks.io) follows Debian's cron: the DOM/DOW OR rule when neither
day field starts with *, and two ways through DST changes (wall-clock times for expressions whose
minute and hour are fixed; real minutes for the others). The property compares the two on random
expressions, zones and instants; the examples pin the cases a reader would ask about.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from cronsim import CronSim, CronSimError
from hypothesis import assume, given
from hypothesis import strategies as st

ZONES = ["UTC", "Asia/Kolkata", "America/New_York", "Europe/London", "Europe/Berlin",
         "Australia/Sydney", "Asia/Kathmandu", "America/Santiago", "Australia/Lord_Howe", "Pacific/Chatham"]
MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
#: (low, high, names) of each field
FIELDS = [(0, 59, None), (0, 23, None), (1, 31, None), (1, 12, MONTHS), (0, 7, DAYS)]


@st.composite
def items(draw: st.DrawFn, field: int) -> str:
    lo, hi, names = FIELDS[field]

    def value(v: int) -> str:
        if names is not None and draw(st.booleans()) and (field != 4 or v < 7):
            return names[v - lo if field == 3 else v]
        return str(v)

    kind = draw(st.sampled_from(["value", "range", "star_step", "range_step", "start_step"]))
    a = draw(st.integers(lo, hi))
    if kind == "value":
        return value(a)
    if kind == "star_step":
        return f"*/{draw(st.integers(1, hi - lo + 1))}"
    if kind == "start_step":
        return f"{a}/{draw(st.integers(1, hi - lo + 1))}"
    b = draw(st.integers(a, hi))
    text = f"{value(a)}-{value(b)}"
    return text if kind == "range" else f"{text}/{draw(st.integers(1, hi - lo + 1))}"


@st.composite
def fields(draw: st.DrawFn, field: int) -> str:
    if draw(st.integers(0, 3)) == 0:
        return "*"
    return ",".join(draw(st.lists(items(field), min_size=1, max_size=3)))


expressions = st.tuples(*(fields(i) for i in range(5))).map(" ".join)
instants = st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2036, 12, 31),
                        timezones=st.just(UTC))


def sql_next(db: psycopg.Connection[Any], cron: str, tz: str, after: datetime) -> datetime | None:
    row = db.execute("SELECT reactor.cron_next(%s, %s, %s)", (cron, tz, after)).fetchone()
    assert row is not None
    value: datetime | None = row[0]
    return value


def oracle_next(cron: str, tz: str, after: datetime) -> datetime | None:
    try:
        it = CronSim(cron, after.astimezone(ZoneInfo(tz)))
        return next(it).astimezone(UTC)
    except StopIteration:
        return None


@given(cron=expressions, tz=st.sampled_from(ZONES), after=instants)
def test_cron_next_agrees_with_cronsim(db: psycopg.Connection[Any], cron: str, tz: str, after: datetime) -> None:
    try:
        expected = oracle_next(cron, tz, after)
    except CronSimError:
        # cronsim refuses day-of-month values no chosen month has (31 in FEB); the database accepts
        # them and finds no time, which job_schedules refuses at INSERT
        assert sql_next(db, cron, tz, after) is None
        return
    # cronsim can answer a wall-clock time before `after` when `after` lies in the second pass of a
    # repeated hour; the database never goes back (a slot must move forward)
    assume(expected is None or expected > after)
    assert sql_next(db, cron, tz, after) == expected, (cron, tz, after)


@given(cron=expressions, tz=st.sampled_from(ZONES), after=instants)
def test_three_slots_in_a_row_agree_with_cronsim(db: psycopg.Connection[Any], cron: str, tz: str,
                                                 after: datetime) -> None:
    try:
        it = CronSim(cron, after.astimezone(ZoneInfo(tz)))
        expected = [next(it).astimezone(UTC) for _ in range(3)]
    except (CronSimError, StopIteration):
        return
    assume(expected[0] > after and expected[1] > expected[0] and expected[2] > expected[1])
    got, at = [], after
    for _ in range(3):
        nxt = sql_next(db, cron, tz, at)
        assert nxt is not None
        got.append(nxt)
        at = nxt
    assert got == expected, (cron, tz, after)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(("cron", "tz", "after", "expected"), [
    ("* * * * *", "UTC", "2026-01-01 10:00:30", "2026-01-01 10:01:00"),
    ("*/15 * * * *", "UTC", "2026-01-01 10:15:00", "2026-01-01 10:30:00"),
    ("0 9 * * MON-FRI", "Asia/Kolkata", "2026-01-02 04:00:00", "2026-01-05 03:30:00"),  # Fri after 9:30 IST
    ("0 0 1 jan *", "UTC", "2026-03-01 00:00:00", "2027-01-01 00:00:00"),
    # DOM/DOW OR: the 13th or any Friday
    ("0 0 13 * FRI", "UTC", "2026-02-01 00:00:00", "2026-02-06 00:00:00"),
    # a star in either day field: AND (every Friday, with */1 counting as a star)
    ("0 0 */1 * FRI", "UTC", "2026-02-01 00:00:00", "2026-02-06 00:00:00"),
    ("0 12 * * 7", "UTC", "2026-02-01 12:00:00", "2026-02-08 12:00:00"),  # 7 is Sunday
    # New York, spring forward 2026-03-08 02:00 -> 03:00: 02:30 runs at 03:00 EDT
    ("30 2 * * *", "America/New_York", "2026-03-08 00:00:00", "2026-03-08 07:00:00"),
    # fall back 2026-11-01: 01:30 happens twice and runs once, at the first (EDT)
    ("30 1 * * *", "America/New_York", "2026-11-01 00:00:00", "2026-11-01 05:30:00"),
    ("30 1 * * *", "America/New_York", "2026-11-01 05:30:00", "2026-11-02 06:30:00"),
    # every 20 minutes in hour 1: the repeated hour runs twice
    ("*/20 1 * * *", "America/New_York", "2026-11-01 05:40:00", "2026-11-01 06:00:00"),
    ("0 0 29 2 *", "UTC", "2026-01-01 00:00:00", "2028-02-29 00:00:00"),
])
def test_cron_next_examples(db: psycopg.Connection[Any], cron: str, tz: str, after: str, expected: str) -> None:
    assert sql_next(db, cron, tz, utc(after)) == utc(expected)
    assert oracle_next(cron, tz, utc(after)) == utc(expected)


def test_impossible_dates_name_no_time(db: psycopg.Connection[Any]) -> None:
    assert sql_next(db, "0 0 31 2 *", "UTC", utc("2026-01-01 00:00:00")) is None
    assert sql_next(db, "0 0 30 2 *", "UTC", utc("2026-01-01 00:00:00")) is None


@pytest.mark.parametrize(("cron", "says"), [
    ("", "0 fields"),
    ("* * * *", "4 fields"),
    ("* * * * * *", "6 fields"),
    ("60 * * * *", "minute field has 60 out of range 0-59"),
    ("* 24 * * *", "hour field has 24 out of range 0-23"),
    ("* * 0 * *", "day-of-month field has 0 out of range 1-31"),
    ("* * * 13 *", "month field has 13 out of range 1-12"),
    ("* * * * 8", "day-of-week field has 8 out of range 0-7"),
    ("* * * * FUNDAY", "day-of-week field has a bad value 'FUNDAY'"),
    ("*/0 * * * *", "step of 0"),
    ("5-1 * * * *", "runs backwards"),
    ("1,,2 * * * *", "bad item ''"),
    ("@daily", "1 fields"),
    ("0 0 31 2 *", "names no time in the next 50 years"),
])
def test_bad_cron_is_refused_at_insert_naming_the_column(db: psycopg.Connection[Any], cron: str,
                                                         says: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        db.execute("INSERT INTO job_schedules (name, cron, job_type) VALUES ('s', %s, 'daily_ca')", (cron,))
    assert err.value.diag.column_name == "cron"
    assert err.value.diag.table_name == "job_schedules"
    assert says in str(err.value)
    assert "job_schedules.cron" in str(err.value)


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "utc+5", "+05:30"])
def test_bad_time_zone_is_refused_at_insert_naming_the_column(db: psycopg.Connection[Any], tz: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        db.execute("INSERT INTO job_schedules (name, cron, timezone, job_type) "
                   "VALUES ('s', '* * * * *', %s, 'daily_ca')", (tz,))
    assert err.value.diag.column_name == "timezone"


def test_a_good_schedule_shows_its_next_run_at_once(db: psycopg.Connection[Any]) -> None:
    row = db.execute(
        "INSERT INTO job_schedules (name, cron, timezone, job_type) "
        "VALUES ('s', '0 6 * * *', 'Asia/Kolkata', 'daily_ca') "
        "RETURNING next_run_at, now()").fetchone()
    assert row is not None
    next_run, now = row
    assert now < next_run <= now + timedelta(days=1)
    assert next_run.astimezone(ZoneInfo("Asia/Kolkata")).strftime("%H:%M") == "06:00"
