"""Every environment variable the reactor reads, read in this one place.

:meth:`Environment.read` takes them once (the CLI does, at start, and builds its frozen settings
from them and the arguments: reactor/cli/settings.py); nothing else in the package looks at
``os.environ``. An empty variable reads as unset. The embedded PostgreSQL, used by the demo, the
tests and the benchmarks without a command line, reads its own four when not given them.

==============================  ================================================================
variable                        meaning
==============================  ================================================================
``DATABASE_URL``                the DSN, in place of ``--dsn``
``REACTOR_ORCHESTRATOR_URL``    the Video Orchestrator, in place of ``--orchestrator-url``
``REACTOR_JWT_SECRET``          the HS256 secret of the feed's tokens
``REACTOR_TLS_CERT``, ``_KEY``  serve https/wss, in place of ``--tls-cert`` and ``--tls-key``
``REACTOR_ALERT_WEBHOOK``       where alerts are posted, in place of ``--alert-webhook``
``REACTOR_REST_KEY``            ``reactor smoke``'s PostgREST key, in place of ``--rest-key``
``PGPORT``                      libpq's default port (the transaction-pooler check reads it)
``NOTIFY_SOCKET``,              set by systemd (``Type=notify``, ``WatchdogSec=``)
``WATCHDOG_USEC``, ``_PID``
``REACTOR_PG_BIN``,             the embedded PostgreSQL: server binaries, data directory, the OS
``REACTOR_EMBEDDED_DIR``,       user it runs as under root, and ``XDG_DATA_HOME`` for its
``REACTOR_PG_USER``             default directory
==============================  ================================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

__all__ = ["Environment", "inherited"]


@dataclass(frozen=True)
class Environment:
    """The reactor's environment variables (None: unset or empty). Secrets stay out of its repr."""

    database_url: str | None = field(default=None, repr=False, metadata={"name": "DATABASE_URL"})
    orchestrator_url: str | None = field(default=None, repr=False, metadata={"name": "REACTOR_ORCHESTRATOR_URL"})
    jwt_secret: str | None = field(default=None, repr=False, metadata={"name": "REACTOR_JWT_SECRET"})
    tls_cert: str | None = field(default=None, metadata={"name": "REACTOR_TLS_CERT"})
    tls_key: str | None = field(default=None, metadata={"name": "REACTOR_TLS_KEY"})
    alert_webhook: str | None = field(default=None, repr=False, metadata={"name": "REACTOR_ALERT_WEBHOOK"})
    rest_key: str | None = field(default=None, repr=False, metadata={"name": "REACTOR_REST_KEY"})
    pgport: str | None = field(default=None, metadata={"name": "PGPORT"})
    notify_socket: str | None = field(default=None, metadata={"name": "NOTIFY_SOCKET"})
    watchdog_usec: str | None = field(default=None, metadata={"name": "WATCHDOG_USEC"})
    watchdog_pid: str | None = field(default=None, metadata={"name": "WATCHDOG_PID"})
    pg_bin: str | None = field(default=None, metadata={"name": "REACTOR_PG_BIN"})
    embedded_dir: str | None = field(default=None, metadata={"name": "REACTOR_EMBEDDED_DIR"})
    pg_user: str | None = field(default=None, metadata={"name": "REACTOR_PG_USER"})
    xdg_data_home: str | None = field(default=None, metadata={"name": "XDG_DATA_HOME"})

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        """The variables of ``environ`` (default: this process's environment, now)."""
        source = os.environ if environ is None else environ
        return cls(**{f.name: source.get(f.metadata["name"]) or None for f in fields(cls)})


def inherited(*, without_prefix: str) -> dict[str, str]:
    """This process's environment for a child process, less the variables that start with the prefix."""
    return {k: v for k, v in os.environ.items() if not k.startswith(without_prefix)}
