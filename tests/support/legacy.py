"""A database whose payload guard (migration 0006) is off: rows inserted meanwhile are not checked
at the door, like rows written before an upgrade. The rest of the schema stays current, so the
reactor's own statements run against it as they do in production."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

__all__ = ["without_payload_guard"]


@contextmanager
def without_payload_guard(dsn: str) -> Iterator[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE reactor.jobs DISABLE TRIGGER jobs_payload_guard_insert")
        conn.execute("ALTER TABLE reactor.jobs DISABLE TRIGGER jobs_payload_guard_update")
    try:
        yield dsn
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE reactor.jobs ENABLE TRIGGER jobs_payload_guard_insert")
            conn.execute("ALTER TABLE reactor.jobs ENABLE TRIGGER jobs_payload_guard_update")
