"""Settings, built once from the arguments and the environment, then passed down frozen.

:func:`reactor.cli.main.main` reads the environment once (:class:`~reactor.core.environment.Environment`);
each command takes what it needs from the arguments first, then from there. ``reactor run`` gets one
:class:`~reactor.service.ServiceSettings` (:func:`service_settings`), with the feed's, the
dispatcher's, the alerts' and systemd's parts in it. A missing setting fails fast, naming both the
option and the variable.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from reactor.core.environment import Environment
from reactor.core.errors import ConfigError

if TYPE_CHECKING:
    from reactor.service import ServiceSettings
    from reactor.web.settings import FeedSettings

__all__ = ["add_dsn", "feed_settings", "orchestrator_url", "parse_listen", "resolve_dsn", "service_settings"]


def add_dsn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", help="PostgreSQL DSN (default: $DATABASE_URL)")


def resolve_dsn(dsn: str | None, env: Environment) -> str:
    """The database DSN: ``--dsn``, else ``DATABASE_URL``; fail fast naming both."""
    value = dsn or env.database_url or ""
    if not value.strip():
        raise ConfigError("no database given: pass --dsn DSN or set DATABASE_URL")
    return value.strip()


def orchestrator_url(value: str | None, env: Environment) -> str:
    """``--orchestrator-url``, else ``REACTOR_ORCHESTRATOR_URL``: an http(s) URL."""
    url = value or env.orchestrator_url or ""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            "no orchestrator given: pass --orchestrator-url http://HOST:PORT "
            "or set REACTOR_ORCHESTRATOR_URL"
        )
    return url


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or :PORT (every interface)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen must be HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def feed_settings(args: argparse.Namespace, env: Environment) -> FeedSettings | None:
    """The feed's settings from --listen and friends (None without --listen)."""
    from reactor.web.auth import AuthSettings
    from reactor.web.settings import FeedSettings, tls_context

    listen = getattr(args, "listen", None)
    if not listen:
        return None
    host, port = parse_listen(listen)
    auth = AuthSettings(jwt_secret=env.jwt_secret, jwks=args.jwks, audience=args.jwt_audience)
    cert = args.tls_cert or env.tls_cert
    key = args.tls_key or env.tls_key
    tls_context(cert, key)  # fail now, with a clear message, on a missing or unreadable file
    return FeedSettings(
        auth=auth, host=host, port=port, allowed_origins=tuple(args.allowed_origin),
        max_clients=args.max_clients, max_unauthenticated=args.max_unauthenticated,
        request_rate=args.request_rate, request_burst=args.request_burst, tls_cert=cert, tls_key=key,
    )


def service_settings(args: argparse.Namespace, env: Environment, dsn: str, orchestrator: str) -> ServiceSettings:
    """Everything ``reactor run`` passes its service."""
    from reactor.engine.dispatcher import DispatchSettings
    from reactor.ops.alerts import settings_from
    from reactor.ops.systemd import SystemdSettings
    from reactor.service import ServiceSettings, new_reactor_id

    return ServiceSettings(
        dsn=dsn,
        orchestrator_url=orchestrator,
        reactor_id=args.reactor_id or new_reactor_id(),
        sweep_every_s=args.sweep_seconds,
        dispatch=DispatchSettings(
            max_inflight=args.max_inflight,
            lease_s=args.lease_seconds,
            renew_every_s=args.lease_seconds / 3,
            drain_grace_s=args.drain_seconds,
        ),
        feed=feed_settings(args, env),
        alerts=settings_from(getattr(args, "alert_webhook", None), env),
        systemd=SystemdSettings.from_environment(env),
    )
