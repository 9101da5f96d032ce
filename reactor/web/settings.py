"""The feed's settings (``reactor run --listen`` and friends) and its TLS context."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from reactor.core.errors import ConfigError
from reactor.web.auth import AuthSettings

__all__ = ["FeedSettings", "tls_context"]


@dataclass(frozen=True)
class FeedSettings:
    auth: AuthSettings
    host: str = "127.0.0.1"
    port: int = 0
    #: Origin values browsers may connect from; empty: any. Clients that send no Origin (servers,
    #: scripts: not a browser page) are always let through to authenticate.
    allowed_origins: tuple[str, ...] = ()
    #: authenticated clients at most (more: HTTP 503, or 1013 "too many clients" after an auth message)
    max_clients: int = 1000
    #: connections not yet authenticated at most (from the TCP accept to a token accepted; HTTP
    #: requests included); one more pushes out the oldest. None: max(100, max_clients // 2)
    max_unauthenticated: int | None = None
    #: largest message a client may send (an auth message with its token)
    max_message_bytes: int = 8192
    auth_timeout_s: float = 5.0
    #: messages a signed-in client may send (dashboard requests, fresh tokens): this many a second on
    #: average, in bursts of up to ``request_burst``; beyond that it is closed with 1008 "too many requests"
    request_rate: float = 20.0
    request_burst: int = 40
    heartbeat_s: float = 15.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    close_timeout_s: float = 3.0
    #: rounds of writes start at least this far apart (events arriving meanwhile go out together)...
    flush_interval_s: float = 0.005
    #: ...and far enough apart that writing them takes at most this share of the event loop's time
    #: (1,000 local clients: ~16 ms of CPU a round, so one every ~30 ms); the dispatcher keeps the rest
    fanout_share: float = 0.5
    #: with no client connected the feed only keeps its seq and this reactor's figures (reactor/web/
    #: metrics.py) up to date: it reads the log at most this often (a read costs a few ms of CPU: at
    #: 0.1 s, 40 ms a second on a reactor with nothing else to do); a client connecting ends the pause
    idle_interval_s: float = 1.0
    #: admins' coalesced stats are read at most this often...
    stats_interval_s: float = 1.0
    #: ...and far enough apart that the read takes at most this share of the time: get_queue_stats()
    #: scans the jobs finished in the last hour for its hour figures (about 0.2 s at 100 jobs/s
    #: sustained, bench/README.md), so a busy queue is read every few seconds instead of every second
    stats_share: float = 0.05
    position_interval_s: float = 0.5
    #: events kept in memory; a client further behind than this is closed as too slow
    max_lag: int = 10_000
    #: events a reconnecting client may ask to replay; further back it gets a resync
    max_replay: int = 10_000
    #: a client whose unsent output exceeds this is served by its own task (backpressure)
    write_buffer_bytes: int = 64 * 1024
    #: SO_SNDBUF of each feed connection, bounding what the kernel holds for a client that does not
    #: read; None: the kernel's default (autotuned, up to net.ipv4.tcp_wmem's maximum)
    send_buffer_bytes: int | None = None
    snapshot_jobs: int = 50
    snapshot_queue: int = 50
    #: admins share a snapshot taken this recently (a reconnect storm costs one query)
    snapshot_cache_s: float = 1.0
    pool_size: int = 4
    #: serve https/wss with this certificate chain and key (PEM); None: plain http/ws
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_clients", "request_burst", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"the feed's {name} must be at least 1")
        if self.max_unauthenticated is not None and self.max_unauthenticated < 1:
            raise ConfigError("the feed's max_unauthenticated must be at least 1")
        if not self.request_rate > 0:
            raise ConfigError("the feed's request_rate must be above 0")
        if not 0 < self.stats_share <= 1:
            raise ConfigError("the feed's stats_share must be above 0 and at most 1")

    @property
    def unauthenticated_limit(self) -> int:
        if self.max_unauthenticated is not None:
            return self.max_unauthenticated
        return max(100, self.max_clients // 2)


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server TLS context from PEM files (TLS 1.2 or newer), or None for plain HTTP."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from exc
    return ctx

