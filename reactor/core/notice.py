"""A NOTIFY payload, read once into a typed :class:`Notice`: the one place its keys are interpreted.

NOTIFY is a wake-up, the tables are the truth. Anyone who can connect may NOTIFY the reactor's
channels, so :func:`parse_notice` never raises: text that is not a JSON object, or nests more than
4 deep, is ignored (at most one warning a minute), and a field of the wrong type reads as absent.
The payloads the reactor itself sends (README, "Events, sequence numbers and NOTIFY"): for one job
change ``{seq, n: 1, kind, id, status, old_status, priority, job_type, renderer, user_id, actor}``,
for several ``{seq, n, q, f, c, actor}``, and ``{truncated: true}`` after a TRUNCATE. A reactor's
outcomes carry ``claiming: true`` when the same transaction claims after them, and its claim
``more: true`` when it took all it asked for while the limits leave room (migration 0014).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from reactor.core.models import parse_uuid
from reactor.core.policy import nested_deeper_than

__all__ = ["CHANNELS", "LOG_CHANNEL", "Notice", "parse_notice"]

logger = logging.getLogger(__name__)

#: job events and config changes (dispatch and feed), alert transitions and circuit states (feed),
#: a job delayed to a future run_after (dispatch) and a schedule changed (the scheduler)
CHANNELS = ("reactor_events", "reactor_config", "reactor_alerts", "reactor_fleet", "reactor_due",
            "reactor_schedules")
#: a reactor's cycle that gives nobody else work (its outcomes, all finished, and its claim of the
#: room they freed; migration 0017): the same payloads as reactor_events, followed by a feed with
#: clients, never by a dispatcher
LOG_CHANNEL = "reactor_log"


#: deeper payloads are ignored: the reactor's own are 1 deep, and anyone may NOTIFY these channels
_MAX_NOTICE_DEPTH = 4


@dataclass(frozen=True)
class Notice:
    """One notification, read once into typed fields (NOTIFY is a wake-up: the tables are the truth).

    Anyone who can connect may NOTIFY our channels, so every field is checked: one of the wrong
    type reads as absent. ``payload`` is the decoded JSON object (``{}`` when it was not one), for
    the feed's alert and circuit messages.
    """

    channel: str
    payload: dict[str, Any] = field(default_factory=dict)
    #: reactor_events: the event's seq (the last one's, for several) and how many it covers
    seq: int | None = None
    n: int = 0
    #: one event: its kind, job, status before and after
    kind: str | None = None
    job_id: UUID | None = None
    status: str | None = None
    old_status: str | None = None
    #: several events: how many became queued, left processing, were cancelled
    queued: int = 0
    finished: int = 0
    cancelled: int = 0
    actor: str | None = None
    truncated: bool = False
    #: a reactor's outcomes, and the same transaction claims after them (it takes the room they free)
    claiming: bool = False
    #: a reactor's claim took all it asked for while the limits leave room: others may claim too
    more: bool = False


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and len(value) <= 256 else None


def parse_notice(channel: str, text: str) -> Notice:
    """A notification's payload as a :class:`Notice`; never raises, whatever ``text`` holds."""
    try:
        value = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        _ignored(channel, "not JSON", text)
        return Notice(channel)
    if not isinstance(value, dict):
        _ignored(channel, "not a JSON object", text)
        return Notice(channel)
    if nested_deeper_than(value, _MAX_NOTICE_DEPTH):
        _ignored(channel, "nested too deep", text)
        return Notice(channel)
    seq = value.get("seq")
    return Notice(
        channel, value,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None,
        n=_count(value.get("n")), kind=_text(value.get("kind")), job_id=parse_uuid(value.get("id")),
        status=_text(value.get("status")), old_status=_text(value.get("old_status")),
        queued=_count(value.get("q")), finished=_count(value.get("f")), cancelled=_count(value.get("c")),
        actor=_text(value.get("actor")), truncated=value.get("truncated") is True,
        claiming=value.get("claiming") is True, more=value.get("more") is True,
    )


_last_ignored = 0.0
_ignored_since = 0


def _ignored(channel: str, why: str, text: str) -> None:
    """One warning a minute at most: anyone may flood a channel."""
    global _last_ignored, _ignored_since
    _ignored_since += 1
    now = time.monotonic()
    if now - _last_ignored >= 60.0:
        logger.warning("ignoring a notification on %s (%s; %d ignored since the last warning): %.200r",
                       channel, why, _ignored_since, text)
        _last_ignored, _ignored_since = now, 0
