"""Where the SQL files live: inside the installed package, or ``sql/`` in a source checkout."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from reactor.core.errors import ReactorError

__all__ = ["load_queries", "sql_dir"]


@functools.cache
def sql_dir() -> Path:
    package = Path(__file__).resolve().parent.parent  # reactor/
    checkout, wheel = package.parent / "sql", package / "sql"  # a source checkout, then an installed wheel
    for candidate in (checkout, wheel):
        if (candidate / "migrations").is_dir():
            return candidate
    raise ReactorError(f"the reactor's SQL files are missing (looked in {checkout} and {wheel})")


_HEADER = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


@functools.cache
def load_queries(filename: str = "queries.sql") -> dict[str, str]:
    """Named queries from a file of ``-- name: xyz`` sections."""
    text = (sql_dir() / filename).read_text()
    parts = _HEADER.split(text)
    queries = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if not queries:
        raise ReactorError(f"no named queries in {filename}")
    return queries
