"""The orchestrator double's outcomes: the global mix and the markers a job's input carries.

How the outcome of a render is chosen, the settings ``POST /control`` takes: see
reactor/testing/orchestrator.py.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["OUTCOME_NAMES", "SETTING_KEYS", "Markers", "normalize_outcome", "number", "parse_markers",
           "parse_mix", "validate_mix", "validate_settings"]

logger = logging.getLogger(__name__)

#: The outcomes without a parameter; ``status:<code>`` comes on top of these.
OUTCOME_NAMES: tuple[str, ...] = ("ok", "hang", "malformed", "garbage", "reset")

SETTING_KEYS = frozenset(
    {"latency_ms", "jitter_ms", "mix", "retry_after_s", "health_status", "seed", "video_base"}
)
_MARKER_RE = re.compile(r"\[\[\s*([A-Za-z_]+)\s*(?:=\s*([^\]]*?))?\s*\]\]")


def normalize_outcome(raw: str) -> str:
    """Return the canonical name of an outcome (``status=500`` -> ``status:500``)."""
    text = raw.strip().lower()
    if text in OUTCOME_NAMES:
        return text
    for sep in (":", "="):
        prefix = "status" + sep
        if text.startswith(prefix):
            code_text = text[len(prefix) :].strip()
            try:
                code = int(code_text)
            except ValueError:
                raise ValueError(f"bad status code in outcome {raw!r}") from None
            if not 400 <= code <= 599:
                raise ValueError(f"status outcome must be 400-599, got {code}")
            return f"status:{code}"
    raise ValueError(f"unknown outcome {raw!r} (expected one of {', '.join(OUTCOME_NAMES)} or status:<code>)")


def number(name: str, value: Any, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result) or result < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return result


def validate_mix(mix: Any) -> dict[str, float]:
    if not isinstance(mix, Mapping) or not mix:
        raise ValueError(f"mix must be a non-empty mapping outcome -> weight, got {mix!r}")
    result: dict[str, float] = {}
    for key, weight in mix.items():
        if not isinstance(key, str):
            raise ValueError(f"mix keys must be outcome strings, got {key!r}")
        outcome = normalize_outcome(key)
        result[outcome] = result.get(outcome, 0.0) + number(f"mix weight of {key!r}", weight)
    if sum(result.values()) <= 0:
        raise ValueError("mix weights must not all be zero")
    return result


def parse_mix(text: str) -> dict[str, float]:
    """Parse ``"ok=90,status:500=5,hang=5"`` into ``{"ok": 90.0, "status:500": 5.0, ...}``."""
    raw: dict[str, float] = {}
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        name, sep, weight_text = item.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"bad mix entry {item!r} (expected OUTCOME=WEIGHT)")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(f"bad weight in mix entry {item!r}") from None
        raw[name.strip()] = raw.get(name.strip(), 0.0) + weight
    return validate_mix(raw)


@dataclass(frozen=True, slots=True)
class Markers:
    outcome: str | None = None  # first plain outcome marker
    fail_first: tuple[int, str] | None = None
    fail_first_wins: bool = False  # fail_first came before any plain outcome marker
    latency_ms: float | None = None


def parse_markers(text: str) -> Markers:
    outcome: str | None = None
    fail_first: tuple[int, str] | None = None
    fail_first_wins = False
    latency: float | None = None
    for match in _MARKER_RE.finditer(text):
        name = match.group(1).lower()
        value = (match.group(2) or "").strip()
        try:
            if name == "latency":
                if latency is None:
                    latency = number("latency marker", float(value))
            elif name == "fail_first":
                if fail_first is None:
                    count_text, sep, what = value.partition(":")
                    if not sep:
                        raise ValueError("expected fail_first=N:OUTCOME")
                    count = int(count_text)
                    if count < 0:
                        raise ValueError("fail_first count must be >= 0")
                    fail_first = (count, normalize_outcome(what))
                    fail_first_wins = outcome is None
            elif name == "status":
                if outcome is None:
                    outcome = normalize_outcome(f"status:{value}")
            elif name in OUTCOME_NAMES and not value:
                if outcome is None:
                    outcome = name
            else:
                logger.debug("ignoring unknown marker %s", match.group(0))
        except ValueError as exc:
            logger.warning("ignoring bad marker %s: %s", match.group(0), exc)
    return Markers(outcome, fail_first, fail_first_wins, latency)


def validate_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``configure`` (and ``POST /control``) was given, checked: ValueError on an
    unknown key or a bad value."""
    unknown = set(settings) - SETTING_KEYS
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(SETTING_KEYS))}"
        )
    new: dict[str, Any] = {}
    if "latency_ms" in settings:
        new["latency_ms"] = number("latency_ms", settings["latency_ms"])
    if "jitter_ms" in settings:
        new["jitter_ms"] = number("jitter_ms", settings["jitter_ms"])
    if "retry_after_s" in settings:
        new["retry_after_s"] = number("retry_after_s", settings["retry_after_s"])
    if "mix" in settings:
        new["mix"] = validate_mix(settings["mix"])
    if "health_status" in settings:
        status = settings["health_status"]
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"health_status must be an HTTP status code, got {status!r}")
        new["health_status"] = status
    if "video_base" in settings:
        base = settings["video_base"]
        if base is not None and (not isinstance(base, str) or not base.startswith(("http://", "https://"))):
            raise ValueError(f"video_base must be an http(s) URL or null, got {base!r}")
        new["video_base"] = base
    if "seed" in settings:
        seed = settings["seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or null, got {seed!r}")
        new["seed"] = seed
    return new
