"""What a client may send the feed, checked before anything reads it: every message is untrusted.

Shape first (nesting depth, size is bounded by the server), then a JSON parser that refuses what
JSON allows but nobody means (NaN, Infinity, 1e999, integers longer than 20 digits, lone
surrogates). A message refused here closes that client alone, with a close code and a short reason
(:class:`ClientRefused`); a handshake refused here gets HTTP 400 (:class:`BadRequest`). README, "Limits".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.frames import CloseCode

from reactor.core.errors import ReactorError

__all__ = [
    "INTERNAL",
    "LOGGED_REFUSALS",
    "POLICY",
    "TRY_LATER",
    "UNSUPPORTED",
    "BadRequest",
    "ClientRefused",
    "auth_message",
    "nonneg_int",
    "parse",
    "peer",
    "single_header",
]

# close codes
POLICY = CloseCode.POLICY_VIOLATION  # 1008: authentication, malformed messages, expiry
UNSUPPORTED = CloseCode.UNSUPPORTED_DATA  # 1003: binary messages
TRY_LATER = CloseCode.TRY_AGAIN_LATER  # 1013: too slow, too many clients
INTERNAL = CloseCode.INTERNAL_ERROR  # 1011
#: closes logged (one line each): what the client sent was refused. Not logged: expiry, load shedding
LOGGED_REFUSALS = frozenset({"bad_message", "auth", "rate_limited"})


class ClientRefused(ReactorError):
    """A client is closed with ``code`` and ``reason``; ``metric`` is the reason counted in metrics."""

    def __init__(self, code: int, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.metric = metric


class BadRequest(ReactorError):
    """An HTTP request refused at the handshake with 400 and this reason."""


#: a client message nests at most this deep (the protocol's messages nest 2 deep)
_MAX_DEPTH = 8
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
_MAX_INT_DIGITS = 20
_MAX_SEQ = 2**62


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError("number out of range")
    return int(text)


def _too_deep(text: str) -> bool:
    """True if the brackets outside strings nest deeper than _MAX_DEPTH (checked before parsing:
    json.loads recurses once per level)."""
    depth = 0
    for m in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > _MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _valid_strings(value: object) -> bool:
    """False if a string (key or value) holds a lone surrogate ("\\ud800"): it could not be sent back."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def parse(raw: str | bytes) -> dict[str, Any]:
    """A client's message: a JSON object with a type, as text; anything else closes that client.

    Shape first (nesting depth), then a parser that refuses what JSON allows but nobody means: NaN,
    Infinity, 1e999, integers longer than 20 digits, lone surrogates. Raises only :class:`ClientRefused`.
    """
    if isinstance(raw, bytes):
        raise ClientRefused(UNSUPPORTED, "binary messages are not accepted", "bad_message")
    if _too_deep(raw):
        raise ClientRefused(POLICY, "malformed message: nested too deep", "bad_message")
    try:
        msg = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except (ValueError, RecursionError):
        raise ClientRefused(POLICY, "malformed message: not JSON", "bad_message") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ClientRefused(POLICY, "malformed message: expected an object with a type", "bad_message")
    if not _valid_strings(msg):
        raise ClientRefused(POLICY, "malformed message: invalid unicode", "bad_message")
    return msg


def auth_message(msg: Mapping[str, Any]) -> tuple[str, int | None]:
    """The token and the ``since`` of a first message, which must be ``auth``; raises :class:`ClientRefused`."""
    if msg.get("type") != "auth":
        raise ClientRefused(POLICY, "expected an auth message first", "bad_message")
    since: int | None = None
    if msg.get("since") is not None:
        since = nonneg_int(msg["since"])
        if since is None:
            raise ClientRefused(POLICY, "malformed message: since must be a whole number", "bad_message")
    token = msg.get("token")
    if not isinstance(token, str) or not token:
        raise ClientRefused(POLICY, "malformed message: token must be a string", "bad_message")
    return token, since


def nonneg_int(value: object) -> int | None:
    """A seq from a client: a JSON integer or a string of ASCII digits (not "١٢٣", not "１２")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < _MAX_SEQ else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        return int(value)
    return None


def single_header(headers: Headers, name: str) -> str | None:
    """A header that must appear at most once (two Origin or Authorization headers: a 400)."""
    values = headers.get_all(name)
    if len(values) > 1:
        raise BadRequest(f"more than one {name} header")
    return values[0] if values else None


def peer(ws: ServerConnection) -> str:
    try:
        address = ws.remote_address
    except (AttributeError, OSError):
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
