"""Timestamps a row can hold that Python cannot (reactor/db/pgtypes.py): read as ``datetime.max`` or
``datetime.min`` (UTC), never an exception, in text and binary format and in any session time zone;
every other value exactly as psycopg reads it (the lenient loader wraps psycopg's own, the C one)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from reactor.db import pgtypes

LATEST = datetime.max.replace(tzinfo=UTC)
EARLIEST = datetime.min.replace(tzinfo=UTC)

CASES = [
    ("infinity", LATEST),
    ("-infinity", EARLIEST),
    ("10001-01-01 00:00:00+00", LATEST),
    ("0044-03-15 12:00:00+00 BC", EARLIEST),
    ("2026-12-07 19:30:01.123456+00", datetime(2026, 12, 7, 19, 30, 1, 123456, tzinfo=UTC)),
    ("0001-01-01 00:00:00+00", EARLIEST),
    ("9999-12-31 23:59:59.999999+00", LATEST),
]


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/St_Johns"])
def test_timestamps_out_of_pythons_range_read_as_its_ends(dsn: str, binary: bool, zone: str) -> None:
    pgtypes.install()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
        for text, expected in CASES:
            row: Any = conn.execute("SELECT %s::timestamptz", (text,), binary=binary).fetchone()
            assert row is not None
            got = row[0]
            assert got == expected, (text, got)
        # an ordinary value keeps the session's offset, as psycopg gives it
        row = conn.execute("SELECT '2026-06-01 12:00:00+00'::timestamptz", binary=binary).fetchone()
        assert row is not None and row[0] == datetime(2026, 6, 1, 12, tzinfo=UTC)
        if zone == "Asia/Kolkata":
            assert row[0].utcoffset() == timedelta(hours=5, minutes=30)
            assert row[0].tzinfo is not None and row[0].astimezone(UTC).hour == 12


def test_the_lenient_loaders_wrap_psycopgs_own() -> None:
    # with psycopg[binary], the C loaders (a pure-Python one took 2 us a value, ten times as long)
    text, binary = pgtypes._TimestamptzLoader._impl, pgtypes._TimestamptzBinaryLoader._impl
    assert not issubclass(text, pgtypes._Lenient) and not issubclass(binary, pgtypes._Lenient)
    if psycopg.pq.__impl__ == "binary":
        assert text.__module__.startswith("psycopg_binary") and binary.__module__.startswith("psycopg_binary")
