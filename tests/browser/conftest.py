"""Browser tests of the dashboard: real headless Chromium (Playwright) against a real reactor.

Each test gets a fresh migrated database (the ``dsn``/``db`` fixtures), the orchestrator double and
one reactor serving the feed and the page on a free port, all in-process: they run on an event loop
of their own in a background thread (an anyio blocking portal), because Playwright's sync API runs
its own loop in the test's thread. Chromium is the system's (Debian's ``chromium``, or
``$REACTOR_CHROMIUM``): Playwright never downloads a browser here. Without one the tests skip.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from reactor.ops.alerts import AlertSettings
from reactor.service import Service, ServiceSettings
from reactor.testing.orchestrator import OrchestratorDouble
from reactor.web.auth import AuthSettings
from reactor.web.feed import FeedSettings
from tests.support.reactors import FAST_DISPATCH, running_service

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

SECRET = "dashboard-tests-shared-secret-0123456789"
ADMIN_ID = str(uuid.UUID(int=0xAD))
USER_A = str(uuid.UUID(int=0xA))
USER_B = str(uuid.UUID(int=0xB))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

#: Chromium as this machine allows it: no sandbox as root, and no background traffic to Google
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def find_chromium() -> str | None:
    """``$REACTOR_CHROMIUM``, else Debian's /usr/bin/chromium, else a chromium on PATH."""
    candidates = [os.environ.get("REACTOR_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser"), shutil.which("google-chrome")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def token(role: str = "authenticated", sub: str | None = None, *, admin: bool = False,
          exp_in: float = 3600, **claims: Any) -> str:
    body: dict[str, Any] = {"role": role, "exp": int(time.time() + exp_in), **claims}
    if sub is not None:
        body["sub"] = sub
    if admin:
        body["app_metadata"] = {"role": "admin"}
    return jwt.encode(body, SECRET, algorithm="HS256")


def admin_token() -> str:
    return token(sub=ADMIN_ID, admin=True, email="ops@example.com")


def user_token(sub: str = USER_A) -> str:
    return token(sub=sub, email="student@example.com")


@asynccontextmanager
async def _reactor(dsn: str, orchestrator_url: str, port: int) -> AsyncIterator[Service]:
    settings = ServiceSettings(
        dsn=dsn, orchestrator_url=orchestrator_url, dispatch=FAST_DISPATCH, handle_signals=False,
        feed=FeedSettings(auth=AuthSettings(jwt_secret=SECRET), port=port, heartbeat_s=2.0,
                          stats_interval_s=0.2, position_interval_s=0.1, close_timeout_s=1.0),
        # the tests set alerts' rows themselves; no evaluation must flip them meanwhile
        alerts=AlertSettings(enabled=False),
    )
    async with running_service(Service(settings)) as service:
        yield service


@dataclass
class Dashboard:
    """A running reactor with the feed (and so the page) on ``base_url``."""

    dsn: str
    portal: BlockingPortal
    orchestrator: OrchestratorDouble
    port: int = 0
    _reactor_cm: AbstractContextManager[Service] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, tok: str | None = None) -> str:
        return f"{self.base_url}/" + (f"#token={tok}" if tok else "")

    def start_reactor(self) -> None:
        cm = self.portal.wrap_async_context_manager(_reactor(self.dsn, self.orchestrator.url, self.port))
        service = cm.__enter__()
        self._reactor_cm = cm
        assert service.feed is not None and service.feed.port is not None
        self.port = service.feed.port

    def stop_reactor(self) -> None:
        cm, self._reactor_cm = self._reactor_cm, None
        if cm is not None:
            cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found for the browser tests: install Debian's chromium "
                    "(apt-get install chromium; scripts/test does it as root) or set REACTOR_CHROMIUM")
    return path


# per module, not per session: Playwright's sync API holds an event loop in this thread while it runs,
# and the async tests of other modules need the thread's loop free
@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def dashboard(dsn: str) -> Iterator[Dashboard]:
    with start_blocking_portal(backend="asyncio") as portal, \
            portal.wrap_async_context_manager(OrchestratorDouble(latency_ms=200)) as orch:
        d = Dashboard(dsn, portal, orch)
        d.start_reactor()
        try:
            yield d
        finally:
            d.stop_reactor()


@dataclass
class Console:
    """What the page said on its console: errors and uncaught exceptions fail a test."""

    errors: list[str] = field(default_factory=list)


@pytest.fixture
def console() -> Console:
    return Console()


def _new_page(browser: Browser, console: Console, width: int, height: int) -> Page:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.on("console", lambda m: console.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda exc: console.errors.append(f"uncaught: {exc}"))
    return page


@pytest.fixture
def page(browser: Browser, console: Console) -> Iterator[Page]:
    p = _new_page(browser, console, 1280, 900)
    try:
        yield p
    finally:
        p.context.close()


@pytest.fixture
def phone(browser: Browser, console: Console) -> Iterator[Page]:
    p = _new_page(browser, console, 390, 844)
    try:
        yield p
    finally:
        p.context.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
