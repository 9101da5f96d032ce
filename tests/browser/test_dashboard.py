"""The admin dashboard in real headless Chromium, against a real reactor, database and orchestrator double.

What a person would check: the tiles say what ``get_queue_stats()`` says; jobs appear and change
without a reload; filters, search and the detail view work; admins can cancel, retry, pause and change
limits from the page and the history says who did it; a user's token cannot; the page fits a phone.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

from playwright.sync_api import Page, expect

from tests.browser.conftest import (
    ADMIN_ID,
    USER_A,
    USER_B,
    Console,
    Dashboard,
    admin_token,
    user_token,
)

TIMEOUT_MS = 20_000  # generous: two shared cores, a browser, a database and a reactor
Db = psycopg.Connection[Any]


# -- helpers ----------------------------------------------------------------------------------------


def insert(db: Db, *, job_type: str = "topic_short", priority: str = "medium", user: str | None = None,
           text: str = "Photosynthesis", field: str | None = None) -> str:
    key = field or {"doubt": "question", "topic_short": "topic", "daily_ca": "date"}[job_type]
    row = db.execute(
        "INSERT INTO jobs (job_type, priority, user_id, payload) VALUES (%s, %s, %s, %s) RETURNING id",
        (job_type, priority, user, json.dumps({key: text})),
    ).fetchone()
    assert row
    return str(row[0])


def pause(db: Db) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")


def unpause(db: Db, n: int = 10) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = %s", (n,))


def status_of(db: Db, job_id: str) -> str:
    row = db.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row
    return str(row[0])


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_status(db: Db, job_id: str, status: str, timeout: float = 30.0) -> None:
    wait_until(lambda: status_of(db, job_id) == status, f"job {job_id} to be {status}", timeout)


def stats(db: Db) -> dict[str, Any]:
    with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM get_queue_stats()").fetchone()
    assert row
    return dict(row)


def row(page: Page, job_id: str) -> Any:
    return page.locator(f'#jobs-body tr[data-id="{job_id}"]')


def open_signed_in(page: Page, dashboard: Dashboard, tok: str) -> None:
    page.goto(dashboard.url(tok))
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=TIMEOUT_MS)


def no_console_errors(console: Console) -> None:
    assert console.errors == [], console.errors


# -- tests --------------------------------------------------------------------------------------------


def test_tiles_show_true_counts_and_jobs_change_live(
    page: Page, dashboard: Dashboard, db: Db, console: Console, artifacts: Path,
) -> None:
    done = insert(db, text="Newton's third law")
    failed = insert(db, job_type="doubt", text="Why? [[status=404]]")
    wait_status(db, done, "completed")
    wait_status(db, failed, "failed")
    pause(db)
    for p in ("high", "high", "medium", "low", "low", "low"):
        insert(db, priority=p)
    db.execute("INSERT INTO job_schedules (name, cron, timezone, job_type, payload) "
               "VALUES ('digest', '0 6 * * *', 'Asia/Kolkata', 'daily_ca', '{\"date\": \"{{date}}\"}')")

    tok = admin_token()
    open_signed_in(page, dashboard, tok)
    # the token is read from the fragment, kept in sessionStorage, and gone from the address bar
    assert "#" not in page.url and "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('reactor.dashboard.token')") == tok

    s = stats(db)
    expect(page.locator("#tile-queued .value")).to_have_text(str(s["queued"]), timeout=TIMEOUT_MS)
    assert s["queued"] == 6
    expect(page.locator("#tile-processing .value")).to_have_text(str(s["processing"]))
    expect(page.locator("#tile-completed .value")).to_have_text(str(s["completed_last_hour"]))
    expect(page.locator("#tile-failed .value")).to_have_text(str(s["failed_last_hour"]))
    expect(page.locator("#tile-limits .value")).to_have_text(f"{s['max_renders']} / {s['max_manim_renders']}")
    expect(page.locator("#tile-dispatch .value")).to_have_text("Paused" if s["paused"] else "Running")
    expect(page.locator("#tile-oldest .value")).not_to_have_text("none")
    for p in ("high", "medium", "low"):
        expect(page.locator(f"#prio-{p} .n")).to_have_text(str(s[f"queued_{p}"]))
    # the schedules' next runs
    schedule = page.locator("#schedules-body tr[data-schedule='digest']")
    expect(schedule).to_contain_text("0 6 * * * Asia/Kolkata", timeout=TIMEOUT_MS)
    expect(schedule.locator(".next-run")).not_to_have_text("–")
    expect(page.locator("#schedules-empty")).to_be_hidden()

    # the failed job: its category and message, as the database has them
    err = db.execute("SELECT error_category, error_message FROM jobs WHERE id = %s", (failed,)).fetchone()
    assert err and err[0] == "NOT_FOUND" and err[1]
    expect(row(page, failed).locator(".status")).to_have_text("failed")
    expect(row(page, failed).locator("td.err")).to_contain_text(err[0])
    expect(row(page, failed).locator("td.err")).to_contain_text(err[1])
    expect(row(page, done).locator("a")).to_have_attribute("href", re.compile("^https?://"))

    # a job inserted with SQL shows up queued, then completed, without a reload
    page.evaluate("window.__noReload = true")
    live = insert(db, job_type="doubt", priority="high", text="Why is the sky blue?")
    expect(row(page, live).locator(".status")).to_contain_text("queued", timeout=TIMEOUT_MS)
    expect(page.locator("#tile-queued .value")).to_have_text("7", timeout=TIMEOUT_MS)
    unpause(db)
    expect(row(page, live).locator(".status")).to_contain_text("completed", timeout=TIMEOUT_MS)
    wait_until(lambda: stats(db)["queued"] == 0 and stats(db)["processing"] == 0, "the queue to drain")
    s = stats(db)
    expect(page.locator("#tile-queued .value")).to_have_text("0", timeout=TIMEOUT_MS)
    expect(page.locator("#tile-completed .value")).to_have_text(str(s["completed_last_hour"]), timeout=TIMEOUT_MS)
    expect(page.locator("#tile-dispatch .value")).to_have_text("Running")
    assert page.evaluate("window.__noReload") is True

    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
    no_console_errors(console)


def test_sign_in_form_without_a_token_shows_no_data(
    page: Page, dashboard: Dashboard, db: Db, console: Console,
) -> None:
    job = insert(db)
    page.goto(dashboard.url())
    expect(page.locator("#signin")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#dash")).to_be_hidden()
    expect(page.locator("#jobs-body tr")).to_have_count(0)
    expect(page.locator("#conn")).to_have_attribute("data-state", "signed-out")

    # not a JWT: refused in the page; a bad signature: refused by the server, with its reason
    page.locator("#token-input").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("JWT")
    forged = jwt.encode({"role": "service_role", "exp": int(time.time()) + 600},
                        "another-secret-0123456789abcdef-0123456789", algorithm="HS256")
    page.locator("#token-input").fill(forged)
    page.locator("#token-input").press("Enter")  # Enter signs in (a token has no new lines)
    expect(page.locator("#signin-error")).to_contain_text("bad signature", timeout=TIMEOUT_MS)
    expect(page.locator("#jobs-body tr")).to_have_count(0)

    # a good one, typed into the form, signs in; sign out forgets it
    page.locator("#token-input").fill(admin_token())
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=TIMEOUT_MS)
    expect(row(page, job)).to_be_visible(timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('reactor.dashboard.token')") is None
    no_console_errors(console)


def test_filters_search_and_the_detail_history(
    page: Page, dashboard: Dashboard, db: Db, console: Console,
) -> None:
    ok_doubt = insert(db, job_type="doubt", priority="high", user=USER_A, text="Why is the sky blue?")
    ok_topic = insert(db, priority="low", user=USER_B)
    bad = insert(db, job_type="daily_ca", priority="medium", user=USER_A, text="2024-01-01 [[status=404]]")
    retried = insert(db, job_type="doubt", priority="low", user=USER_B, text="How? [[fail_first=1:status=503]]")
    for j, st in ((ok_doubt, "completed"), (ok_topic, "completed"), (bad, "failed"), (retried, "completed")):
        wait_status(db, j, st)

    open_signed_in(page, dashboard, admin_token())
    rows = page.locator("#jobs-body tr")
    expect(rows).to_have_count(4, timeout=TIMEOUT_MS)

    page.locator("#f-status").select_option("failed")
    expect(rows).to_have_count(1)
    expect(row(page, bad)).to_be_visible()
    page.locator("#f-status").select_option("")
    page.locator("#f-priority").select_option("low")
    expect(rows).to_have_count(2)
    page.locator("#f-type").select_option("doubt")
    expect(rows).to_have_count(1)
    expect(row(page, retried)).to_be_visible()
    page.locator("#f-priority").select_option("")
    page.locator("#f-type").select_option("")
    page.locator("#f-user").fill(USER_A[-6:])
    expect(rows).to_have_count(2)
    page.locator("#f-user").fill("")
    page.locator("#f-search").fill(ok_topic[:8])
    expect(rows).to_have_count(1)
    expect(row(page, ok_topic)).to_be_visible()
    expect(page.locator("#jobs-count")).to_contain_text("1 of 4")
    page.locator("#f-search").fill("")
    expect(rows).to_have_count(4)

    # the detail: payload, result with the video, and the history of the retried job, by keyboard
    row(page, retried).get_by_role("button").focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#detail")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(retried, timeout=TIMEOUT_MS)
    expect(dialog.locator("pre").first).to_contain_text("fail_first")
    kinds = dialog.locator("table.history tbody tr td:nth-child(3)")
    expect(kinds).to_have_text(["inserted", "started", "retrying", "started", "completed"], timeout=TIMEOUT_MS)
    video = db.execute("SELECT result->>'video_url' FROM jobs WHERE id = %s", (retried,)).fetchone()
    assert video and video[0]
    expect(dialog.get_by_role("link", name=video[0])).to_have_attribute("href", video[0])
    expect(dialog.get_by_role("button", name="Cancel job")).to_have_count(0)  # completed: nothing to cancel
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(row(page, retried).get_by_role("button")).to_be_focused()

    # a failed job's detail names the category and the message
    row(page, bad).get_by_role("button").click()
    expect(dialog.locator(".detail-error")).to_contain_text("NOT_FOUND", timeout=TIMEOUT_MS)
    expect(dialog.locator(".detail-error")).to_contain_text("404")
    expect(dialog.get_by_role("button", name="Retry job")).to_be_visible()
    page.get_by_role("button", name="Close job details").click()
    expect(dialog).to_be_hidden()

    # a full id that is not among the recent jobs is looked up on the server
    page.locator("#f-search").fill("00000000-0000-0000-0000-000000000000")
    page.locator("#f-search").press("Enter")
    expect(dialog).to_contain_text("No such job", timeout=TIMEOUT_MS)
    page.keyboard.press("Escape")
    no_console_errors(console)


def actors(db: Db, job_id: str) -> list[tuple[str, str | None]]:
    return [(str(r[0]), r[1]) for r in db.execute(
        "SELECT kind, actor FROM job_events WHERE job_id = %s ORDER BY seq", (job_id,)).fetchall()]


def config(db: Db) -> tuple[int, int]:
    r = db.execute("SELECT max_concurrent_renders, max_manim_renders FROM job_queue_config").fetchone()
    assert r
    return int(r[0]), int(r[1])


def test_admin_cancels_retries_pauses_and_sets_limits_from_the_page(
    page: Page, dashboard: Dashboard, db: Db, console: Console,
) -> None:
    failed = insert(db, text="Plate tectonics [[status=404]]")
    wait_status(db, failed, "failed")
    pause(db)
    queued = insert(db, priority="high")
    me = f"admin:{ADMIN_ID}"

    open_signed_in(page, dashboard, admin_token())
    dialog = page.locator("#detail")

    # cancel, after a confirmation
    row(page, queued).get_by_role("button").click()
    dialog.get_by_role("button", name="Cancel job").click()
    assert status_of(db, queued) == "queued"  # not before it is confirmed
    dialog.get_by_role("button", name="Yes, cancel it").click()
    expect(page.locator("#detail-msg")).to_have_text("Done.", timeout=TIMEOUT_MS)
    wait_status(db, queued, "cancelled")
    assert actors(db, queued)[-1] == ("cancelled", me)
    expect(dialog.locator("table.history tbody tr").last).to_contain_text(me, timeout=TIMEOUT_MS)
    expect(row(page, queued).locator(".status")).to_contain_text("cancelled", timeout=TIMEOUT_MS)
    page.keyboard.press("Escape")

    # retry the failed job: queued again (dispatch is paused, so it stays there)
    row(page, failed).get_by_role("button").click()
    dialog.get_by_role("button", name="Retry job").click()
    expect(page.locator("#detail-msg")).to_have_text("Done.", timeout=TIMEOUT_MS)
    wait_status(db, failed, "queued")
    assert actors(db, failed)[-1][1] == me
    expect(row(page, failed).locator(".status")).to_contain_text("queued", timeout=TIMEOUT_MS)
    expect(row(page, failed).locator("td.err")).to_have_text("", timeout=TIMEOUT_MS)
    page.keyboard.press("Escape")

    # resume: the value the pause replaced comes back, and the retried job runs (and fails again)
    expect(page.locator("[data-kind=paused]")).to_be_visible(timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Resume dispatch").click()
    wait_until(lambda: config(db)[0] == 10, "dispatch to resume")
    wait_status(db, failed, "failed")
    expect(page.locator("#tile-dispatch .value")).to_have_text("Running", timeout=TIMEOUT_MS)
    expect(page.locator("[data-kind=paused]")).to_have_count(0)

    # pause, after a confirmation; then new limits
    page.get_by_role("button", name="Pause dispatch").click()
    page.get_by_role("button", name="Yes, pause").click()
    wait_until(lambda: config(db)[0] == 0, "dispatch to pause")
    expect(page.locator("#tile-dispatch .value")).to_have_text("Paused", timeout=TIMEOUT_MS)
    paused_by = db.execute("SELECT paused_by FROM reactor.paused_limits").fetchone()
    assert paused_by and paused_by[0] == me
    page.get_by_label("Max renders", exact=True).fill("7")
    page.get_by_label("Max Manim renders").fill("3")
    page.get_by_role("button", name="Apply limits").click()
    wait_until(lambda: config(db) == (7, 3), "the new limits")
    expect(page.locator("#tile-limits .value")).to_have_text("7 / 3", timeout=TIMEOUT_MS)
    # a bad value is refused by the page before it is sent
    page.get_by_label("Max renders", exact=True).fill("-1")
    page.get_by_role("button", name="Apply limits").click()
    expect(page.locator("#controls-msg")).to_contain_text("whole number")
    assert config(db) == (7, 3)
    no_console_errors(console)


# every action a user might try, straight over the page's own websocket
_ATTEMPTS = """async ([token, jobs]) => {
  const ws = new WebSocket(`ws://${location.host}/feed`);
  const answers = {};
  await new Promise((resolve, reject) => {
    ws.onerror = () => reject(new Error("websocket error"));
    ws.onopen = () => ws.send(JSON.stringify({type: "auth", token}));
    ws.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      if (m.type === "snapshot") {
        const asks = [
          {type: "action", action: "cancel", id: jobs.queued, request_id: "cancel"},
          {type: "action", action: "retry", id: jobs.failed, request_id: "retry"},
          {type: "action", action: "pause", request_id: "pause"},
          {type: "action", action: "set_limits", values: {max_concurrent_renders: 99}, request_id: "limits"},
          {type: "status", request_id: "status"},
          {type: "job", id: jobs.other, request_id: "other"},
          {type: "job", id: jobs.failed, request_id: "own"},
        ];
        for (const a of asks) ws.send(JSON.stringify(a));
      } else if (m.request_id) {
        answers[m.request_id] = m;
        if (Object.keys(answers).length === 7) resolve();
      }
    };
  });
  ws.close();
  return answers;
}"""


def test_a_user_token_cannot_act(
    page: Page, dashboard: Dashboard, db: Db, console: Console,
) -> None:
    failed = insert(db, user=USER_A, text="Supply and demand [[status=404]]")
    wait_status(db, failed, "failed")
    pause(db)
    queued = insert(db, user=USER_A)
    other = insert(db, user=USER_B)
    before = (actors(db, failed), actors(db, queued), config(db))

    tok = user_token(USER_A)
    open_signed_in(page, dashboard, tok)
    expect(page.locator("#jobs-title")).to_have_text("Your jobs")
    expect(page.locator("#jobs-body tr")).to_have_count(2, timeout=TIMEOUT_MS)
    expect(row(page, other)).to_have_count(0)
    expect(page.locator("#overview")).to_be_hidden()
    expect(page.locator("#controls")).to_be_hidden()
    expect(row(page, queued).locator(".status")).to_contain_text("#1", timeout=TIMEOUT_MS)  # "you are 1st"
    row(page, failed).get_by_role("button").click()
    dialog = page.locator("#detail")
    expect(dialog.locator(".detail-error")).to_contain_text("NOT_FOUND", timeout=TIMEOUT_MS)
    expect(dialog.locator("table.history tbody tr").first).to_be_visible()
    expect(dialog.get_by_role("button", name="Retry job")).to_have_count(0)
    expect(dialog.locator("th", has_text="by")).to_have_count(0)  # who did what is for admins
    page.keyboard.press("Escape")

    answers = page.evaluate(_ATTEMPTS, [tok, {"queued": queued, "failed": failed, "other": other}])
    for name in ("cancel", "retry", "pause", "limits"):
        assert answers[name]["type"] == "action_result"
        assert answers[name]["ok"] is False and answers[name]["error"] == "forbidden", answers[name]
    assert answers["status"]["error"] == "forbidden"
    assert answers["other"] == {"type": "job", "id": other, "error": "not found", "request_id": "other"}
    assert answers["own"]["job"]["id"] == failed
    assert all("actor" not in e for e in answers["own"]["events"])
    # nothing changed
    assert status_of(db, failed) == "failed" and status_of(db, queued) == "queued"
    assert (actors(db, failed), actors(db, queued), config(db)) == before
    no_console_errors(console)


def no_sideways_overflow(page: Page, width: int) -> None:
    wide = page.evaluate("document.documentElement.scrollWidth")
    assert wide <= width, f"the page is {wide} px wide at a {width} px viewport"


def test_alert_banners_and_a_phone_width(
    phone: Page, page: Page, dashboard: Dashboard, db: Db, console: Console, artifacts: Path,
) -> None:
    insert(db, text="x" * 300 + " [[status=404]]")  # a long message must wrap, not widen the page
    for _ in range(3):
        insert(db, job_type="doubt", priority="high")
    wait_until(lambda: stats(db)["queued"] == 0 and stats(db)["processing"] == 0, "the jobs to finish")
    pause(db)
    for p in ("high", "medium", "low", "low"):
        insert(db, priority=p)
    # the render farm is down: this reactor's circuit is open, and an alert fires
    reactor_id = db.execute("SELECT id FROM reactor.reactors").fetchone()
    assert reactor_id
    db.execute("UPDATE reactor.reactors SET circuit_state = 'open', "
               "circuit_since = date_trunc('minute', now()) - interval '3 minutes' WHERE id = %s", (reactor_id[0],))
    db.execute("UPDATE reactor.alerts SET firing = true, since = now(), value = 4, threshold = 3 "
               "WHERE name = 'queue_depth'")

    open_signed_in(phone, dashboard, admin_token())
    banner = phone.locator("[data-kind=circuit]")
    expect(banner).to_contain_text("Render farm unreachable since", timeout=TIMEOUT_MS)
    expect(banner).to_contain_text("4 jobs waiting")
    expect(phone.locator("[data-kind=alert][data-alert=queue_depth]")).to_contain_text(
        "Queue depth 4 is above 3", timeout=TIMEOUT_MS)
    expect(phone.locator("#jobs-body tr")).to_have_count(8, timeout=TIMEOUT_MS)
    no_sideways_overflow(phone, 390)
    phone.screenshot(path=str(artifacts / "dashboard-phone.png"), full_page=True)
    phone.locator("#jobs-body tr").first.get_by_role("button").click()
    expect(phone.locator("#detail table.history tbody tr").first).to_be_visible(timeout=TIMEOUT_MS)
    no_sideways_overflow(phone, 390)
    phone.keyboard.press("Escape")

    # the banners go when the farm is back and the alert resolves (pushed, or read at the next heartbeat)
    db.execute("UPDATE reactor.reactors SET circuit_state = 'closed', circuit_since = now()")
    db.execute("UPDATE reactor.alerts SET firing = false, since = now()")
    expect(phone.locator("[data-kind=circuit]")).to_have_count(0, timeout=TIMEOUT_MS)
    expect(phone.locator("[data-kind=alert]")).to_have_count(0, timeout=TIMEOUT_MS)

    # and the same page on a wide screen
    open_signed_in(page, dashboard, admin_token())
    expect(page.locator("#jobs-body tr")).to_have_count(8, timeout=TIMEOUT_MS)
    no_sideways_overflow(page, 1280)
    no_console_errors(console)


def test_reconnects_and_resumes_without_losing_events(
    page: Page, dashboard: Dashboard, db: Db, console: Console,
) -> None:
    first = insert(db)
    wait_status(db, first, "completed")
    open_signed_in(page, dashboard, admin_token())
    expect(page.locator("#conn")).to_have_attribute("data-mode", "snapshot")
    expect(row(page, first)).to_be_visible(timeout=TIMEOUT_MS)

    dashboard.stop_reactor()  # the feed goes away (1001): the page says so and keeps trying
    expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting", timeout=TIMEOUT_MS)
    expect(page.locator("#conn-text")).to_contain_text("Reconnecting")
    missed = [insert(db, priority="low", text=f"missed {i}") for i in range(3)]  # while nobody serves the feed
    dashboard.start_reactor()  # same port

    # back: resumed from the last seq it saw (no new snapshot), with what happened meanwhile
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=TIMEOUT_MS)
    expect(page.locator("#conn")).to_have_attribute("data-mode", "resumed")
    for j in missed:
        expect(row(page, j).locator(".status")).to_contain_text("completed", timeout=TIMEOUT_MS)
    s = stats(db)
    expect(page.locator("#tile-completed .value")).to_have_text(str(s["completed_last_hour"]), timeout=TIMEOUT_MS)
    # the console may report the refused connections while the server was away: nothing else
    assert all("WebSocket connection" in e for e in console.errors), console.errors
