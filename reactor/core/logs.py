"""Log lines for people and for journald: one line per event, key=value fields, no secrets."""

from __future__ import annotations

import logging
import re
import sys

__all__ = ["KeyValueFormatter", "add_secret", "dsn_secrets", "redact", "setup_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# key=value (libpq allows spaces around "=" and single-quoted values with \' escapes)
_SECRET = re.compile(
    r"""(password|passwd|secret|token)(\s*=\s*)('(?:[^'\\]|\\.)*'?|"[^"]*"?|[^\s&,;]+)""", re.IGNORECASE)
# scheme://user:password@host: up to the last "@" of the word, so that a password with "@" in it
# (postgresql://u:p@ss@host/db) is hidden whole, not cut at its first "@"
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]*:)(\S*)(@)")
_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
#: values hidden wherever they appear (the JWT secret, a DSN's password), registered at start
_known: set[str] = set()


def add_secret(value: str | None) -> None:
    """Hide this value in every log line and every text passed to :func:`redact` from now on."""
    # a shorter one would mangle ordinary words (the patterns above still catch it in a DSN); a part
    # of a password that ends in "@" is distinctive enough from two characters on
    if value and (len(value) >= 4 or (value.endswith("@") and len(value) >= 2)):
        _known.add(value)


def dsn_secrets(dsn: str) -> list[str]:
    """The texts of a DSN that may betray its password, for :func:`add_secret`.

    Besides the password, the part after each "@" in it: libpq splits ``postgresql://u:p@ss@host``
    at the first "@", so its errors name the host ``ss@host``.
    """
    out: list[str] = []
    found = re.search(r"://[^:/@\s]*:(\S*)@", dsn)
    if found:
        out.append(found.group(1))
    out += [m.group(3).strip("'\"") for m in _SECRET.finditer(dsn) if m.group(1).lower() in ("password", "passwd")]
    for password in list(out):
        out += [password[i + 1:] + "@" for i, ch in enumerate(password) if ch == "@"]
    return [p for p in out if p]


def redact(text: str) -> str:
    """Hide passwords and tokens that may sit in a DSN or an error message."""
    text = _SECRET.sub(r"\1\2***", _DSN_PASSWORD.sub(r"\1***\3", text))
    for value in sorted(_known, key=len, reverse=True):
        if value in text:
            text = text.replace(value, "***@" if value.endswith("@") else "***")
    return text


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=reactor.engine.dispatcher msg="job started" job_id=... attempt=1``.

    With ``journald=True`` each line starts with a ``<N>`` syslog priority that journald reads.
    """

    def __init__(self, *, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(redact(record.getMessage()))}",
        ]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                parts.append(f"{key}={_quote(redact(str(value)))}")
        if record.exc_info:
            parts.append(f"exc={_quote(redact(self.formatException(record.exc_info)))}")
        line = " ".join(parts)
        if self.journald:
            line = f"<{_PRIORITY.get(record.levelname, 6)}>{line}"
        return line


def setup_logging(level: str = "INFO", *, journald: bool = False) -> None:
    handler = logging.StreamHandler(sys.stdout if journald else sys.stderr)
    formatter = KeyValueFormatter(journald=journald)
    formatter.converter = __import__("time").gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("httpx", "httpcore", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
