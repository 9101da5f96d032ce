"""What the feed sends: JSON messages, serialised once and framed once for every client.

Every server message is a JSON object with a ``type`` (README, "Live feed"). An event is serialised
twice at most, once for admins (with its ``actor``) and once for the job's user, whatever the number
of clients; a frame is the same bytes for every client (a server's frames are not masked).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from websockets.frames import Frame, Opcode

__all__ = ["Entry", "dumps", "entry", "frame", "heartbeat", "job_json", "moves_queue", "position"]


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(obj: Mapping[str, Any]) -> bytes:
    """A message as compact UTF-8 JSON (times as ISO 8601, uuids as text)."""
    return json.dumps(obj, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode()


def frame(payload: bytes) -> bytes:
    """One unmasked text frame (a server's frames are the same bytes for every client)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


_JOB_FIELDS = (
    "id", "status", "priority", "job_type", "renderer", "user_id", "retry_count", "max_retries",
    "error_category", "error_message", "created_at", "updated_at", "started_at", "completed_at",
)


def job_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A job of a snapshot, as sent."""
    job = {k: row[k] for k in _JOB_FIELDS}
    if row.get("video_url"):
        job["video_url"] = row["video_url"]
    if "queue_position" in row:
        job["queue_position"] = row["queue_position"]
    if row.get("scheduled_for") is not None:
        job["scheduled"] = True  # queued, waiting for its run_after: no queue position until then
        job["run_after"] = row["scheduled_for"]
    return job


@dataclass(frozen=True, slots=True)
class Entry:
    """One event, serialised once: for admins (with the actor) and for the job's user."""

    seq: int
    user_id: UUID | None
    admin: bytes
    user: bytes | None


def entry(row: Mapping[str, Any]) -> Entry:
    """An event row of ``feed_events`` (sql/feed.sql) as its messages."""
    job: dict[str, Any] = {
        "id": row["job_id"], "status": row["status"], "old_status": row["old_status"],
        "priority": row["priority"], "job_type": row["job_type"], "renderer": row["renderer"],
        "user_id": row["user_id"], "retry_count": row["retry_count"], "error_category": row["error_category"],
    }
    if row.get("video_url"):
        job["video_url"] = row["video_url"]
    if row.get("scheduled_for") is not None:
        job["scheduled"] = True
        job["run_after"] = row["scheduled_for"]
    msg = {"type": "event", "seq": row["seq"], "kind": row["kind"], "at": row["at"], "job": job}
    user = dumps(msg) if row["user_id"] is not None else None
    msg["actor"] = row["actor"]
    return Entry(row["seq"], row["user_id"], dumps(msg), user)


def moves_queue(row: Mapping[str, Any]) -> bool:
    """Whether an event changes queue positions (a job became queued or left the queue)."""
    return bool(row["status"] == "queued" or row["old_status"] == "queued")


def position(job_id: UUID, queue_position: int) -> bytes:
    return dumps({"type": "position", "job_id": job_id, "queue_position": queue_position})


def heartbeat(seq: int) -> bytes:
    return dumps({"type": "heartbeat", "seq": seq, "at": datetime.now(UTC)})
