"""Where the SQL files live: inside the installed package, or ``sql/`` in a source checkout."""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

from reactor.errors import ReactorError

__all__ = ["load_queries", "sql_dir"]


@functools.cache
def sql_dir() -> Path:
    checkout = Path(__file__).resolve().parent.parent / "sql"
    if (checkout / "migrations").is_dir():
        return checkout
    try:
        installed = Path(str(resources.files("reactor.sql")))
    except (ModuleNotFoundError, TypeError) as exc:
        raise ReactorError("the reactor's SQL files are missing from this installation") from exc
    if not (installed / "migrations").is_dir():
        raise ReactorError(f"the reactor's SQL files are missing from {installed}")
    return installed


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
