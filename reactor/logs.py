"""Log lines for people and for journald: one line per event, key=value fields, no secrets."""

from __future__ import annotations

import logging
import re
import sys

__all__ = ["KeyValueFormatter", "setup_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET = re.compile(r"(password|passwd|secret|token)=([^\s&]+)", re.IGNORECASE)
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")
_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def redact(text: str) -> str:
    """Hide passwords and tokens that may sit in a DSN or an error message."""
    return _SECRET.sub(r"\1=***", _DSN_PASSWORD.sub(r"\1***\3", text))


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=reactor.dispatch msg="job started" job_id=... attempt=1``.

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
