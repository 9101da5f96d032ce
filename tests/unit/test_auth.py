"""Token rules: algorithms fixed in code, expiry, audience, and who sees what."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from reactor.core.errors import ConfigError
from reactor.web.auth import (
    Authenticator,
    AuthError,
    AuthSettings,
    KeySet,
    UnknownKeyError,
    load_jwks,
    principal_from_claims,
)

SECRET = "unit-test-shared-secret-0123456789abcdef"
USER = str(uuid.uuid4())
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def claims(role: str = "authenticated", sub: str | None = USER, exp_in: float = 86_400,
           **extra: Any) -> dict[str, Any]:
    """Claims that expire in a day by default: parametrized cases are built when the suite is collected,
    and the unit tests may run more than 10 minutes later."""
    body: dict[str, Any] = {"role": role, "exp": int(time.time() + exp_in), **extra}
    if sub is not None:
        body["sub"] = sub
    return body


def hs(body: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(body, secret, algorithm="HS256", headers=headers or None)


def unsigned(body: dict[str, Any], alg: str = "none") -> str:
    def part(obj: dict[str, Any]) -> str:
        return jwt.utils.base64url_encode(json.dumps(obj).encode()).decode()

    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part(body)}."


def jwk(public_key: Any, kid: str) -> dict[str, Any]:
    algo = ECAlgorithm if isinstance(public_key, ec.EllipticCurvePublicKey) else RSAAlgorithm
    data: dict[str, Any] = algo.to_jwk(public_key, as_dict=True)
    data["kid"] = kid
    return data


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [
        jwk(EC_KEY.public_key(), "ec-1"), jwk(RSA_KEY.public_key(), "rsa-1"),
        {"kty": "oct", "k": jwt.utils.base64url_encode(SECRET.encode()).decode(), "kid": "sym"},
    ]}))
    return path


def hs_only(**kw: Any) -> Authenticator:
    return Authenticator(AuthSettings(jwt_secret=SECRET, **kw))


def with_jwks(path: Path, secret: str | None = None) -> Authenticator:
    return Authenticator(AuthSettings(jwt_secret=secret, jwks=str(path)), load_jwks(str(path)))


# -- who sees what ----------------------------------------------------------------------------------


def test_service_role_sees_everything() -> None:
    p = hs_only().verify(hs(claims("service_role", sub=None)))
    assert p.admin and p.user_id is None and p.role == "service_role"
    assert p.may_see(uuid.uuid4()) and p.may_see(None)


def test_authenticated_user_sees_only_own_jobs() -> None:
    p = hs_only().verify(hs(claims()))
    assert not p.admin and p.user_id == uuid.UUID(USER)
    assert p.may_see(uuid.UUID(USER))
    assert not p.may_see(uuid.uuid4()) and not p.may_see(None)


@pytest.mark.parametrize("app_metadata", [{"role": "admin"}, {"admin": True}])
def test_admin_from_app_metadata(app_metadata: dict[str, Any]) -> None:
    assert hs_only().verify(hs(claims(app_metadata=app_metadata))).admin


@pytest.mark.parametrize("extra", [
    {"user_metadata": {"role": "admin"}},
    {"user_metadata": {"admin": True}},
    {"app_metadata": {"admin": "true"}},
    {"app_metadata": {"role": "editor"}},
    {"app_metadata": "admin"},
])
def test_never_admin_from_user_metadata_or_loose_values(extra: dict[str, Any]) -> None:
    p = hs_only().verify(hs(claims(**extra)))
    assert not p.admin and p.user_id == uuid.UUID(USER)


def test_app_metadata_admin_needs_an_authenticated_role() -> None:
    with pytest.raises(AuthError, match="role 'anon'"):
        principal_from_claims(claims("anon", app_metadata={"admin": True}))


@pytest.mark.parametrize(("body", "reason"), [
    (claims("anon"), "role 'anon' may not read the feed"),
    (claims("authenticated", sub=None), "no user id"),
    (claims("authenticated", sub="not-a-uuid"), "no user id"),
    ({"sub": USER, "exp": int(time.time()) + 86400}, "no role"),
])
def test_refused_roles(body: dict[str, Any], reason: str) -> None:
    with pytest.raises(AuthError, match=reason):
        hs_only().verify(hs(body))


# -- signatures and algorithms ----------------------------------------------------------------------


def test_bad_signature() -> None:
    with pytest.raises(AuthError, match="bad signature"):
        hs_only().verify(hs(claims(), secret="some-other-secret-0123456789abcdef-xyz"))


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "HS384", "HS512", "PS256", ""])
def test_algorithms_are_fixed_in_code(alg: str) -> None:
    with pytest.raises(AuthError, match="is not accepted"):
        hs_only().verify(unsigned(claims("service_role"), alg=alg))


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_hs384_signed_with_the_secret_is_refused() -> None:
    token = jwt.encode(claims("service_role"), SECRET, algorithm="HS384")
    with pytest.raises(AuthError, match="'HS384' is not accepted"):
        hs_only().verify(token)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "x" * 100])
def test_malformed_tokens(token: str) -> None:
    with pytest.raises(AuthError):
        hs_only().verify(token)


def test_expired_and_missing_exp() -> None:
    with pytest.raises(AuthError, match="token expired"):
        hs_only().verify(hs(claims(exp_in=-1)))
    with pytest.raises(AuthError, match="token has no exp"):
        hs_only().verify(hs({"role": "service_role"}))
    # within the configured leeway it is still good
    assert hs_only(leeway_s=30).verify(hs(claims(exp_in=-5))).user_id == uuid.UUID(USER)


def test_not_yet_valid() -> None:
    with pytest.raises(AuthError, match="not valid yet"):
        hs_only().verify(hs(claims(nbf=int(time.time()) + 300)))


def test_expiry_is_reported() -> None:
    body = claims(exp_in=120)
    assert hs_only().verify(hs(body)).expires_at == body["exp"]


# -- asymmetric keys from a JWKS --------------------------------------------------------------------


def test_es256_and_rs256_from_a_jwks_file(jwks_file: Path) -> None:
    auth = with_jwks(jwks_file)
    es = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    rs = jwt.encode(claims("service_role", sub=None), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"})
    assert auth.verify(es).user_id == uuid.UUID(USER)
    assert auth.verify(rs).admin


def test_jwks_only_refuses_hs256(jwks_file: Path) -> None:
    # algorithm confusion: an HS256 token "signed" with the public key, or with the JWKS's symmetric key
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    body = jwt.utils.base64url_encode(json.dumps(claims("service_role")).encode())
    mac = hmac.new(pem, head + b"." + body, hashlib.sha256).digest()
    forged = (head + b"." + body + b"." + jwt.utils.base64url_encode(mac)).decode()
    auth = with_jwks(jwks_file)
    for token in (forged, hs(claims("service_role"), kid="sym")):
        with pytest.raises(AuthError, match="'HS256' is not accepted"):
            auth.verify(token)


def test_each_key_verifies_with_its_own_algorithm_only(jwks_file: Path) -> None:
    auth = with_jwks(jwks_file)
    # an RSA-signed token claiming ES256 with the RSA key's kid: no EC key by that name
    token = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"})
    _, body, sig = token.split(".")
    relabelled = jwt.utils.base64url_encode(json.dumps({"alg": "ES256", "kid": "rsa-1"}).encode()).decode()
    with pytest.raises(UnknownKeyError):
        auth.verify(f"{relabelled}.{body}.{sig}")


def test_unknown_kid_and_foreign_key(jwks_file: Path) -> None:
    auth = with_jwks(jwks_file)
    with pytest.raises(UnknownKeyError, match="unknown signing key 'ec-9'"):
        auth.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-9"}))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AuthError, match="bad signature"):
        auth.verify(jwt.encode(claims(), other, algorithm="ES256", headers={"kid": "ec-1"}))


def test_no_kid_uses_the_only_key_of_that_kind(jwks_file: Path) -> None:
    auth = with_jwks(jwks_file)
    assert auth.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256")).user_id == uuid.UUID(USER)


def test_secret_and_jwks_together(jwks_file: Path) -> None:
    auth = with_jwks(jwks_file, secret=SECRET)
    assert auth.verify(hs(claims())).user_id == uuid.UUID(USER)
    assert auth.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})).user_id


def test_unusable_jwks_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ConfigError, match="no RS256 or ES256"):
        load_jwks(str(path))
    path.write_text("not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_jwks(str(path))
    with pytest.raises(ConfigError, match="JSON object with a list"):
        KeySet.from_jwks({"keys": "nope"})
    with pytest.raises(ConfigError, match="REACTOR_JWT_SECRET"):
        AuthSettings()


# -- audience ---------------------------------------------------------------------------------------


def test_audience() -> None:
    auth = hs_only(audience="authenticated")
    assert auth.verify(hs(claims(aud="authenticated"))).user_id == uuid.UUID(USER)
    assert auth.verify(hs(claims(aud=["x", "authenticated"]))).user_id == uuid.UUID(USER)
    with pytest.raises(AuthError, match="another audience"):
        auth.verify(hs(claims(aud="other")))
    with pytest.raises(AuthError, match="no aud"):
        auth.verify(hs(claims()))
    assert auth.verify(hs(claims("service_role", sub=None))).admin  # Supabase's service key has no aud
    # without a configured audience, aud is not checked
    assert hs_only().verify(hs(claims(aud="anything"))).user_id == uuid.UUID(USER)


# -- a JWKS URL is read again when a token names a new key ------------------------------------------


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    keys: list[dict[str, Any]] = [jwk(EC_KEY.public_key(), "ec-1")]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"keys": keys}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", keys
    finally:
        server.shutdown()


@pytest.mark.anyio
async def test_jwks_url_is_read_again_on_an_unknown_kid(jwks_server: tuple[str, list[dict[str, Any]]]) -> None:
    source, keys = jwks_server
    auth = Authenticator(AuthSettings(jwks=source, jwks_refresh_s=0))
    await auth.load_keys()
    assert (await auth.authenticate(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"}))).user_id
    rotated = ec.generate_private_key(ec.SECP256R1())
    keys.append(jwk(rotated.public_key(), "ec-2"))
    token = jwt.encode(claims(), rotated, algorithm="ES256", headers={"kid": "ec-2"})
    assert (await auth.authenticate(token)).user_id == uuid.UUID(USER)
    # at most one read per jwks_refresh_s: a flood of unknown kids does not hammer the URL
    slow = Authenticator(AuthSettings(jwks=source, jwks_refresh_s=3600))
    await slow.load_keys()
    keys.append(jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), "ec-3"))
    with pytest.raises(UnknownKeyError):
        await slow.authenticate(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-3"}))


# -- hostile tokens: every one is an AuthError with a short reason, never another exception ---------


def signed(header: bytes | dict[str, Any], body: bytes | dict[str, Any], secret: str = SECRET) -> str:
    """A token with any header and claims bytes, HS256-signed with the right secret by hand."""
    def part(value: bytes | dict[str, Any]) -> bytes:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return jwt.utils.base64url_encode(raw)

    signing_input = part(header) + b"." + part(body)
    mac = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + jwt.utils.base64url_encode(mac)).decode()


@pytest.mark.parametrize(("header", "reason"), [
    ({"alg": ["HS256"]}, "no alg"),
    ({"alg": {"HS256": True}}, "no alg"),
    ({"alg": 256}, "no alg"),
    ({"alg": None}, "no alg"),
    ({"typ": "JWT"}, "no alg"),
    # recent PyJWT refuses these itself; older ones pass them on to the checks here
    ({"alg": "HS256", "kid": 5}, "malformed token|kid must be a string"),
    ({"alg": "HS256", "kid": ["a"]}, "malformed token|kid must be a string"),
    ({"alg": "HS256", "crit": ["exp"]}, "malformed token|invalid token"),
    (b'["HS256"]', "malformed token"),
    (b'"HS256"', "malformed token"),
    (b"not json", "malformed token"),
    (b"[" * 5000, "malformed token"),
    (b'{"alg": "HS256"', "malformed token"),
    (b"\xff\xfe", "malformed token"),
])
def test_junk_headers_are_refused_with_a_reason(header: bytes | dict[str, Any], reason: str) -> None:
    with pytest.raises(AuthError, match=reason) as info:
        hs_only().verify(signed(header, claims("service_role")))
    assert len(str(info.value)) < 80


@pytest.mark.parametrize("body", [
    b'{"role": "service_role", "exp": 1e999}',
    b'{"role": "service_role", "exp": NaN}',
    b'{"role": "service_role", "exp": -Infinity}',
    b'{"role": "service_role", "exp": 1' + b"0" * 400 + b"}",
    b'{"role": "service_role", "exp": 1' + b"0" * 5000 + b"}",
    b'{"role": "service_role", "exp": "soon"}',
    b'{"role": "service_role", "exp": [1]}',
    b"[" * 5000,
    b"[1, 2]",
    b"null",
])
def test_junk_claims_are_refused_with_a_reason(body: bytes) -> None:
    with pytest.raises(AuthError) as info:
        hs_only().verify(signed({"alg": "HS256", "typ": "JWT"}, body))
    assert str(info.value) and len(str(info.value)) < 80


@pytest.mark.parametrize("token", ["\x00", "é.é.é", "١.٢.٣", "a.b", "...", "a" * 10_000, " " + "a.b.c"])
def test_junk_strings_are_refused(token: str) -> None:
    with pytest.raises(AuthError):
        hs_only().verify(token)


def test_exp_out_of_range_in_claims() -> None:
    for exp in (10**400, float("inf"), float("nan"), -1):
        with pytest.raises(AuthError, match="exp is out of range"):
            principal_from_claims({"role": "service_role", "exp": exp})


def test_the_secret_is_never_in_a_repr() -> None:
    settings = AuthSettings(jwt_secret=SECRET)
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert settings.jwt_secret == SECRET
