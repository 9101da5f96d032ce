"""Settings, read once from arguments and the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping

from reactor.core.errors import ConfigError

__all__ = ["resolve_dsn"]


def resolve_dsn(dsn: str | None, env: Mapping[str, str] | None = None) -> str:
    """The database DSN: ``--dsn``, else ``DATABASE_URL``; fail fast naming both."""
    environ = os.environ if env is None else env
    value = dsn or environ.get("DATABASE_URL") or ""
    if not value.strip():
        raise ConfigError("no database given: pass --dsn DSN or set DATABASE_URL")
    return value.strip()
