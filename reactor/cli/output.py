"""How the command line prints: plain lines, aligned tables, values as an operator reads them, JSON."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ago", "fmt", "json_default", "print_json", "say", "table"]


def say(text: str = "") -> None:
    print(text)  # noqa: T201


def json_default(value: object) -> object:
    import dataclasses
    import datetime as dt
    import decimal
    import uuid

    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_json(value: object) -> None:
    import json

    say(json.dumps(value, default=json_default, indent=2))


def fmt(value: object) -> str:
    """A value as an operator reads (and `config set` takes) it."""
    import datetime as dt
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(value, dt.time):
        return value.strftime("%H:%M")
    if isinstance(value, dt.timedelta):
        if value.seconds == 0 and value.microseconds == 0:
            return f"{value.days} days" if value.days != 1 else "1 day"
        return f"{value.total_seconds():g} seconds"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        say("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
