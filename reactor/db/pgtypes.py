"""How the reactor reads PostgreSQL values that a user wrote: never with an exception.

A row is user input (``jobs.payload`` is written by students through PostgREST), and psycopg
decodes every column while it reads the rows, before any per-job code runs: one value that fails to
decode fails the whole fetch, and with it every job claimed in the same statement. So:

* jsonb is decoded by :func:`lenient_loads`: a value that cannot be decoded (nested deeper than
  Python's recursion limit, about 1,000 levels, where PostgreSQL accepts about 10,000) comes back
  as :class:`~reactor.core.models.Undecodable` carrying the reason;
* a timestamp Python cannot hold (``infinity``, years past 9999 or BC) comes back as
  ``datetime.max`` or ``datetime.min`` (UTC) instead of raising ``DataError``.

:func:`install` applies the lenient forms to every connection the process opens;
:func:`guard_payloads` makes one connection (the dispatcher's) use :func:`payload_loads`, which
also refuses a value past the payload limits of :mod:`reactor.core.policy` (a row written before the SQL
contract refused such payloads at INSERT).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import abc
from psycopg.abc import AdaptContext
from psycopg.adapt import AdaptersMap, Buffer, Loader
from psycopg.pq import Format
from psycopg.types.datetime import TimestamptzBinaryLoader, TimestamptzLoader
from psycopg.types.json import set_json_loads

from reactor.core.models import Undecodable
from reactor.core.policy import MAX_PAYLOAD_BYTES, MAX_PAYLOAD_DEPTH, nested_deeper_than

__all__ = ["guard_payloads", "install", "lenient_loads", "payload_loads"]

_LATEST = datetime.max.replace(tzinfo=UTC)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


def _decode(data: str | bytes, max_bytes: int | None, max_depth: int | None) -> Any:
    if max_bytes is not None and len(data) > max_bytes:
        return Undecodable(f"is {len(data)} bytes as JSON text; at most {max_bytes}")
    try:
        value = json.loads(data)
    except RecursionError:
        return Undecodable("is nested too deep to decode")
    except ValueError as exc:  # not JSON, not UTF-8: PostgreSQL never sends these for jsonb
        return Undecodable(f"cannot be decoded: {str(exc)[:100]}")
    if max_depth is not None and nested_deeper_than(value, max_depth):
        return Undecodable(f"is nested more than {max_depth} levels deep")
    return value


def lenient_loads(data: str | bytes) -> Any:
    """``json.loads``, with :class:`Undecodable` in place of an exception."""
    return _decode(data, None, None)


def payload_loads(data: str | bytes) -> Any:
    """:func:`lenient_loads`, and a value past the payload limits is Undecodable too."""
    return _decode(data, MAX_PAYLOAD_BYTES, MAX_PAYLOAD_DEPTH)


def _text_out_of_range(data: Buffer) -> datetime:
    text = bytes(data)
    return _EARLIEST if text.startswith(b"-") or text.endswith(b"BC") else _LATEST


def _binary_out_of_range(data: Buffer) -> datetime:
    # microseconds since 2000-01-01, big-endian: the sign says which end
    return _EARLIEST if bytes(data)[:1] >= b"\x80" else _LATEST


def _implementation(fmt: Format) -> type[abc.Loader]:
    """psycopg's own timestamptz loader for ``fmt``, as registered when this module is imported: the
    C one of psycopg[binary] (about 0.2 us a value against 2 us for the pure Python one)."""
    found = psycopg.adapters.get_loader(psycopg.adapters.types["timestamptz"].oid, fmt)
    if found is None or issubclass(found, _Lenient):
        return TimestamptzLoader if fmt == Format.TEXT else TimestamptzBinaryLoader
    return found


class _Lenient(Loader):
    """psycopg's loader, with ``datetime.max``/``min`` (UTC) where it raises ``DataError``."""

    _impl: type[abc.Loader]
    _out_of_range: Callable[[Buffer], datetime]

    def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
        super().__init__(oid, context)
        self._load = self._impl(oid, context).load

    def load(self, data: Buffer) -> datetime:
        try:
            value: datetime = self._load(data)
        except psycopg.DataError:
            return self._out_of_range(data)
        return value


class _TimestamptzLoader(_Lenient):
    format = Format.TEXT
    _out_of_range = staticmethod(_text_out_of_range)


class _TimestamptzBinaryLoader(_Lenient):
    format = Format.BINARY
    _out_of_range = staticmethod(_binary_out_of_range)


_TimestamptzLoader._impl = _implementation(Format.TEXT)
_TimestamptzBinaryLoader._impl = _implementation(Format.BINARY)


def _register_timestamps(adapters: AdaptersMap) -> None:
    adapters.register_loader("timestamptz", _TimestamptzLoader)
    adapters.register_loader("timestamptz", _TimestamptzBinaryLoader)


def install() -> None:
    """Every connection opened from now on reads jsonb and timestamps without raising."""
    set_json_loads(lenient_loads)  # no context: for every connection
    _register_timestamps(psycopg.adapters)


def guard_payloads(conn: psycopg.AsyncConnection[Any]) -> None:
    """On this connection, jsonb is read with :func:`payload_loads`."""
    set_json_loads(payload_loads, conn)
    _register_timestamps(conn.adapters)
