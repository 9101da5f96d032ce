"""Exceptions raised by the reactor.

Every exception class of the package derives from :class:`ReactorError` (tests/unit/test_errors.py
walks the package to check it). The ones defined here are shared by several layers; the others
live with the code that raises them::

    ReactorError
    ├── ConfigError            a setting is missing or invalid
    ├── DatabaseError          the database refused or could not be reached
    │   ├── DatabaseUnavailable  it could not be reached or did not answer: worth trying again
    │   │   └── DatabaseTimeout  no connection or no answer in time
    │   ├── MigrationError     the schema cannot be brought to the wanted version
    │   ├── SchemaMissing      a table the reactor needs is not there: run `reactor migrate`
    │   └── StatementRefused   the database refused a statement: the same one would fail again
    ├── EmbeddedPostgresError  the private PostgreSQL could not be set up or started
    ├── PartFailed             a part of the reactor failed too often to be restarted
    ├── RenderError            a render call failed; carries an error category
    ├── InvalidPayload         (core/policy.py, also a ValueError) a job's payload cannot be rendered
    ├── AuthError              (web/auth.py) a token was refused
    │   └── UnknownKeyError    the token names a key the key set does not hold
    ├── ClientRefused          (web/protocol.py) a feed client is closed for what it sent
    ├── BadRequest             (web/protocol.py) a feed handshake is answered 400
    ├── Refused                (ops/runbook.py) a runbook command ran and the answer is no (exit 1)
    │   ├── JobNotFoundError   no job has this id
    │   ├── JobStateError      the job's status does not allow the change
    │   └── ScheduleNotFoundError  no schedule has this name
    └── SmokeFailed            (ops/smoke.py) a step of the smoke test failed

Private ones, never seen outside their module, join too: the render client's ``_Dropped`` and
``_Malformed``, the dashboard's ``_Failed``, the orchestrator double's ``_BadRequest``. Messages
are short and say what to do; third-party errors are wrapped with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatabaseError",
    "DatabaseTimeout",
    "DatabaseUnavailable",
    "EmbeddedPostgresError",
    "MigrationError",
    "PartFailed",
    "ReactorError",
    "RenderError",
    "SchemaMissing",
    "StatementRefused",
]


class ReactorError(Exception):
    """Root of the reactor's exceptions."""


class ConfigError(ReactorError):
    """A setting is missing or invalid."""


class DatabaseError(ReactorError):
    """The database refused a request or could not be reached."""


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached, dropped the connection, or asked to try again (a deadlock,
    a serialization failure, a shutdown): the same statement may succeed later."""


class DatabaseTimeout(DatabaseUnavailable):
    """No connection could be had, or no answer came, in time."""


class MigrationError(DatabaseError):
    """The schema cannot be brought to the wanted version."""


class SchemaMissing(DatabaseError):
    """A table the reactor needs is not there (a migration is not applied): run ``reactor migrate``."""


class StatementRefused(DatabaseError):
    """The database refused a statement (a constraint, a value it cannot store): not an outage, so
    sending the same statement again would fail again."""


class EmbeddedPostgresError(ReactorError):
    """The private PostgreSQL could not be set up or started."""


class PartFailed(ReactorError):
    """A part of the reactor failed too often to be restarted: the process should exit."""

    def __init__(self, part: str, failures: int, window_s: float, last: str) -> None:
        super().__init__(f"{part} failed {failures} times within {window_s:g} s, giving up (last: {last})")
        self.part = part
        self.failures = failures
        self.last = last


class RenderError(ReactorError):
    """A render call failed.

    ``category`` is one of the error categories stored on the job (TIMEOUT, API_ERROR,
    INVALID_INPUT, NOT_FOUND, UNKNOWN); ``retry_after`` is the delay the orchestrator asked for.
    """

    def __init__(
        self,
        category: str,
        message: str,
        *,
        status_code: int | None = None,
        body: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.category = category
        self.message = message
        self.status_code = status_code
        self.body = body
        self.retry_after = retry_after
        #: the orchestrator was unreachable or dropped the connection (not an answer about the job)
        self.transport = False
