"""Who may read the feed: Supabase-style JWTs, checked with algorithms fixed here, never by the token.

Accepted tokens:

* ``HS256`` signed with the shared secret (Supabase's legacy JWT secret, ``REACTOR_JWT_SECRET``);
* ``ES256`` (EC P-256) and ``RS256`` (RSA) signed by a key of a JWKS document (a file, or an URL
  that is read again, at most every ``jwks_refresh_s``, when a token names a key it does not hold).

The header's ``alg`` only chooses which key to try; each key verifies with the one algorithm of its
kind (the secret: HS256; an RSA key: RS256; a P-256 key: ES256), so ``alg: none`` and algorithm
confusion (an HS256 token "signed" with a public key) are refused. ``exp`` is required and checked.
When an audience is configured, a token that carries ``aud`` must name it, and only a
``service_role`` token may carry none (Supabase's service key has no ``aud``).

What a caller may see (:class:`Principal`):

* ``role = service_role``, or an ``authenticated`` user whose ``app_metadata`` says admin
  (``app_metadata.role == "admin"`` or ``app_metadata.admin == true``): everything. ``app_metadata``
  is set by the server only; ``user_metadata``, which users edit themselves, is never read;
* ``role = authenticated`` with a uuid ``sub``: the jobs whose ``user_id`` is that uuid;
* anything else (``anon``, no role, no ``sub``): nothing; the token is refused.
"""

from __future__ import annotations

import binascii
import json
import logging
import math
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import jwt
from jwt.exceptions import PyJWKError

from reactor.core.errors import ConfigError, ReactorError
from reactor.core.logs import redact
from reactor.core.models import parse_uuid

__all__ = [
    "AuthError",
    "AuthSettings",
    "Authenticator",
    "KeySet",
    "Principal",
    "UnknownKeyError",
    "load_jwks",
    "principal_from_claims",
]

logger = logging.getLogger(__name__)

#: the algorithm each kind of key verifies with (nothing else is ever accepted)
SECRET_ALGORITHM = "HS256"
JWKS_ALGORITHMS = frozenset({"RS256", "ES256"})
#: what PyJWT (any version we accept) and the JSON decoder may raise on a hostile token; each is a
#: refusal, never a crash: a header whose ``alg`` is a list, claims nested 5,000 deep, ``exp: 1e999``
_TOKEN_ERRORS: tuple[type[Exception], ...] = (
    jwt.PyJWTError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
    RecursionError, binascii.Error, UnicodeError,
)
#: the latest exp accepted (year 9999): anything later is not a time
_MAX_EXP = 253_402_300_799


class AuthError(ReactorError):
    """A token was refused; ``str(exc)`` is a short reason safe to show the client."""


class UnknownKeyError(AuthError):
    """The token names a key (``kid``) that the key set does not hold."""


@dataclass(frozen=True)
class AuthSettings:
    #: the HS256 shared secret; None: HS256 tokens are refused (never in a repr: settings get logged)
    jwt_secret: str | None = field(default=None, repr=False)
    #: a JWKS document: a file path or an http(s) URL; None: ES256/RS256 tokens are refused
    jwks: str | None = None
    #: the audience tokens must carry, if any (Supabase user tokens carry "authenticated")
    audience: str | None = None
    #: clock skew allowed on exp/nbf/iat, in seconds
    leeway_s: float = 0.0
    #: a JWKS URL is read again on an unknown kid, at most this often
    jwks_refresh_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.jwt_secret and not self.jwks:
            raise ConfigError(
                "the feed needs a way to check tokens: set REACTOR_JWT_SECRET (HS256) or pass --jwks PATH_OR_URL"
            )


@dataclass(frozen=True)
class Principal:
    """Who is connected, and what they may see."""

    admin: bool
    #: the user's id (``sub``); None for a service_role token without a uuid sub
    user_id: UUID | None
    role: str
    #: ``exp``, in seconds since the epoch
    expires_at: float

    def may_see(self, user_id: UUID | None) -> bool:
        return self.admin or (user_id is not None and user_id == self.user_id)

    def same_identity(self, other: Principal) -> bool:
        return (self.admin, self.user_id) == (other.admin, other.user_id)


@dataclass(frozen=True)
class _Key:
    kid: str | None
    algorithm: str
    key: Any


class KeySet:
    """The public keys of a JWKS document that this module accepts (RSA for RS256, P-256 for ES256)."""

    def __init__(self, keys: list[_Key] | None = None) -> None:
        self.keys = list(keys or [])

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any]) -> KeySet:
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise ConfigError("a JWKS document must be a JSON object with a list of keys")
        keys: list[_Key] = []
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            kty, crv = entry.get("kty"), entry.get("crv")
            if kty == "RSA":
                algorithm = "RS256"
            elif kty == "EC" and crv == "P-256":
                algorithm = "ES256"
            else:
                continue  # symmetric and other keys are never taken from a JWKS
            if entry.get("alg", algorithm) != algorithm:
                continue
            try:
                key = jwt.PyJWK(entry, algorithm=algorithm).key
            except PyJWKError as exc:
                logger.warning("skipping a JWKS key that cannot be read: %s", exc)
                continue
            kid = entry.get("kid")
            keys.append(_Key(kid if isinstance(kid, str) else None, algorithm, key))
        return cls(keys)

    def find(self, kid: object, algorithm: str) -> _Key:
        matching = [k for k in self.keys if k.algorithm == algorithm]
        if isinstance(kid, str):
            for k in matching:
                if k.kid == kid:
                    return k
            raise UnknownKeyError(f"unknown signing key {kid[:64]!r}")
        if len(matching) == 1:
            return matching[0]
        raise UnknownKeyError("token has no kid and the key set has no single key for it")


def load_jwks(source: str, *, timeout_s: float = 10.0) -> KeySet:
    """Read a JWKS document from a file or an http(s) URL (blocking: call it in a thread)."""
    try:
        if source.startswith(("http://", "https://")):
            req = urllib.request.Request(source, headers={"accept": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                text = resp.read(1_000_000).decode()
        else:
            text = Path(source).read_text()
        document = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the JWKS {redact(source)}: {redact(str(exc))}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"the JWKS {redact(source)} is not a JSON object")
    keys = KeySet.from_jwks(document)
    if not keys.keys:
        raise ConfigError(f"the JWKS {redact(source)} holds no RS256 or ES256 signing key")
    return keys


def principal_from_claims(claims: Mapping[str, Any], audience: str | None = None) -> Principal:
    """The rules of who sees what, applied to verified claims."""
    role = claims.get("role")
    if not isinstance(role, str):
        raise AuthError("token has no role")
    if audience is not None:
        aud = claims.get("aud")
        if aud is None:
            if role != "service_role":
                raise AuthError("token has no aud")
        elif not (aud == audience or (isinstance(aud, list) and audience in aud)):
            raise AuthError("token is for another audience")
    app_metadata = claims.get("app_metadata")
    if not isinstance(app_metadata, Mapping):
        app_metadata = {}
    admin = role == "service_role" or (
        role == "authenticated"
        and (app_metadata.get("role") == "admin" or app_metadata.get("admin") is True)
    )
    user_id = parse_uuid(claims.get("sub"))
    if not admin:
        if role != "authenticated":
            raise AuthError(f"role {role[:32]!r} may not read the feed")
        if user_id is None:
            raise AuthError("token has no user id (sub)")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AuthError("token has no exp")
    # compared as a number before any float(): 10**400 would overflow, NaN compares false
    if not 0 <= exp <= _MAX_EXP or not math.isfinite(exp):
        raise AuthError("token exp is out of range")
    return Principal(admin=admin, user_id=user_id, role=role, expires_at=float(exp))


class Authenticator:
    """Verifies tokens against the configured secret and key set."""

    def __init__(
        self, settings: AuthSettings, keys: KeySet | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.keys = keys or KeySet()
        self._clock = clock
        self._last_load: float | None = None

    async def load_keys(self) -> None:
        """Read the JWKS, if one is configured (at start: a missing or empty JWKS fails fast)."""
        if self.settings.jwks:
            self.keys = await anyio.to_thread.run_sync(load_jwks, self.settings.jwks)
            self._last_load = self._clock()

    def verify(self, token: str) -> Principal:
        """The caller a token speaks for; raises :class:`AuthError` with a short reason (and nothing
        else, whatever the token holds)."""
        if not isinstance(token, str) or not token:
            raise AuthError("no token")
        if not token.isascii():
            raise AuthError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except _TOKEN_ERRORS as exc:
            raise AuthError("malformed token") from exc
        if not isinstance(header, dict):
            raise AuthError("malformed token")
        # the header is the attacker's: check each field's type before using it
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str):
            raise AuthError("token header has no alg")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("token header kid must be a string")
        key: Any
        if alg == SECRET_ALGORITHM and self.settings.jwt_secret:
            key, algorithm = self.settings.jwt_secret, SECRET_ALGORITHM
        elif alg in JWKS_ALGORITHMS and self.settings.jwks:
            found = self.keys.find(kid, alg)
            key, algorithm = found.key, found.algorithm
        else:
            raise AuthError(f"algorithm {alg[:16]!r} is not accepted")
        try:
            claims = jwt.decode(
                token, key, algorithms=[algorithm], leeway=self.settings.leeway_s,
                options={"require": ["exp"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("bad signature") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token has no {exc.claim}") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthError("token not valid yet") from exc
        except _TOKEN_ERRORS as exc:
            raise AuthError("invalid token") from exc
        if not isinstance(claims, dict):
            raise AuthError("invalid token")
        return principal_from_claims(claims, self.settings.audience)

    async def authenticate(self, token: str) -> Principal:
        """:meth:`verify`, reading a JWKS URL again when the token names a key not seen yet."""
        try:
            return self.verify(token)
        except UnknownKeyError:
            if not await self._maybe_reload():
                raise
            return self.verify(token)

    async def _maybe_reload(self) -> bool:
        source = self.settings.jwks
        if not source or not source.startswith(("http://", "https://")):
            return False
        now = self._clock()
        if self._last_load is not None and now - self._last_load < self.settings.jwks_refresh_s:
            return False
        self._last_load = now
        try:
            self.keys = await anyio.to_thread.run_sync(load_jwks, source)
        except ConfigError as exc:
            logger.warning("keeping the old signing keys: %s", exc)  # ConfigError: redacted already
            return False
        return True

