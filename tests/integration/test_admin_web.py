"""The admin web page in a real headless Chromium (Debian's, driven by Playwright).

    smtplib ──▶ A ──smtp:[127.0.0.1]:Q──▶ B (down, then up) ──▶ Maildir
                │
    Chromium ──▶ A's admin server: log in with the token, see the deferred
                 message, retry it after B came up, see it delivered.

The test also takes the screenshots shown in the README, desktop and
phone-sized: ``POSTILLON_SCREENSHOTS=docs pytest tests/integration/test_admin_web.py``
writes them to docs/.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from admin_fixtures import AdminSetup
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import QueueEvent

pytestmark = pytest.mark.integration

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(tempfile.gettempdir()) / "postillon-admin-screenshots"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    # Chromium resolves update hosts even with the flags above; keep it on loopback.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-system-deps.sh")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def seed_chart_history(setup: AdminSetup) -> None:
    """Past hours of activity for the screenshot's chart (the test's own mail
    is all from the last minute). Synthetic queue ids (DEMO...) so nothing is
    mistaken for real mail; the README says the chart history is seeded."""
    rng = random.Random(6)
    now = time.time()
    events = []
    for minute in range(10, 6 * 60, 3):
        at = now - minute * 60
        load = 3 + int(4 * (1 + ((minute // 40) % 3)) * rng.random())
        for i in range(load):
            qid = f"DEMO{minute:05d}{i:08d}"
            events.append(QueueEvent(qid, at, "received"))
            events.append(
                QueueEvent(qid, at + 1, "delivered" if rng.random() > 0.12 else "deferred")
            )
            if rng.random() < 0.03:
                events.append(QueueEvent(qid, at + 2, "bounced"))

    async def write() -> None:
        store = SqliteStore(setup.a.data_dir / "queue" / "queue.db")
        try:
            await store.add_events(events)
        finally:
            await store.close()

    # Playwright's sync API runs an event loop in this thread: use another one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, write()).result()


def shoot(page: object, name: str) -> None:
    """Screenshots go to $POSTILLON_SCREENSHOTS (e.g. docs/, to update the
    README's images); otherwise to a temporary directory, so a test run never
    changes the git tree."""
    target = Path(os.environ.get("POSTILLON_SCREENSHOTS") or SHOTS)
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / name), full_page=True)  # type: ignore[attr-defined]


def log_in(page: object, setup: AdminSetup) -> None:
    page.goto(setup.base + "/")  # type: ignore[attr-defined]
    page.fill("#token", "not-the-token")  # type: ignore[attr-defined]
    page.click("text=Sign in")  # type: ignore[attr-defined]
    page.wait_for_selector("#login-error:has-text('not accepted')")  # type: ignore[attr-defined]
    page.fill("#token", setup.token)  # type: ignore[attr-defined]
    page.click("text=Sign in")  # type: ignore[attr-defined]
    page.wait_for_selector("[data-counter=deferred] .value")  # type: ignore[attr-defined]


def test_log_in_see_deferred_retry_and_see_delivered(
    admin_setup: AdminSetup, browser: object
) -> None:
    setup = admin_setup
    for _ in range(3):  # local mail, delivered at once: the chart has something to show
        setup.send(["bob@example.org"], body=b"Subject: lunch?\r\n\r\nnoon\r\n")
    queue_id = setup.send(["bob@remote.test", "carol@remote.test"])
    setup.wait_log(f"{queue_id}: deferred: to=<carol@remote.test>")
    seed_chart_history(setup)

    context = browser.new_context(viewport=DESKTOP)  # type: ignore[attr-defined]
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    log_in(page, setup)
    page.wait_for_selector("[data-counter=deferred] .value:text-is('2')")
    page.wait_for_selector("#domains td:has-text('remote.test')")
    page.wait_for_selector("[data-series=delivered] .total")
    shoot(page, "admin-dashboard.png")

    page.click("nav >> text=Queue")
    row = page.wait_for_selector(f"tr[data-queue-id='{queue_id}']")
    assert "deferred" in row.inner_text()
    page.select_option("select[name=state]", "held")
    page.click("#filters >> text=Filter")
    page.wait_for_selector("text=No message matches these filters.")
    page.select_option("select[name=state]", "deferred")
    page.fill("input[name=domain]", "remote.test")
    page.click("#filters >> text=Filter")
    page.wait_for_selector(f"tr[data-queue-id='{queue_id}']")
    shoot(page, "admin-queue.png")

    page.click(f"tr[data-queue-id='{queue_id}'] a")
    page.wait_for_selector("h2:has-text('Quarterly report')")
    page.wait_for_selector("[data-event=received]")
    # The inbound checks are the first step of the history.
    assert "spf=pass" in page.inner_text("[data-event=authentication]")
    assert page.locator("[data-event=deferred]").count() == 2
    assert "Connection refused" in page.inner_text("[data-event=deferred] >> nth=0") or (
        "4." in page.inner_text("[data-event=deferred] >> nth=0")
    )
    shoot(page, "admin-message.png")

    # The same on a phone, while the message waits.
    phone = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True)  # type: ignore[attr-defined]
    mobile = phone.new_page()
    log_in(mobile, setup)
    mobile.wait_for_selector("#chart svg")
    # Nothing may stick out sideways on a phone.
    assert mobile.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shoot(mobile, "admin-dashboard-phone.png")
    mobile.goto(f"{setup.base}/#/queue")
    mobile.wait_for_selector(f"tr[data-queue-id='{queue_id}']")
    assert mobile.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shoot(mobile, "admin-queue-phone.png")
    mobile.goto(f"{setup.base}/#/message/{queue_id}")
    mobile.wait_for_selector("[data-event=deferred]")
    assert mobile.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shoot(mobile, "admin-message-phone.png")

    setup.b.start()  # the destination comes up
    page.click("#message button[data-action=retry]")
    page.wait_for_selector("text=This message has left the queue", timeout=30_000)
    page.wait_for_selector("[data-event=delivered]")
    assert page.locator("[data-event=delivered]").count() == 2
    assert page.locator("[data-event=operator]").count() == 1
    setup.b.wait_for_mail("bob@remote.test")
    shoot(page, "admin-message-delivered.png")
    context.close()

    # The phone's page follows by itself (it refreshes every few seconds).
    mobile.wait_for_selector("[data-event=delivered]", timeout=30_000)
    assert mobile.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shoot(mobile, "admin-message-delivered-phone.png")
    phone.close()


def test_the_message_view_shows_the_decisions_and_refused_sessions_are_found(
    admin_setup: AdminSetup, browser: object
) -> None:
    """The checks' decisions (postillon explain) in the message view; a refused
    session (no queue id) found by client IP on the Sessions page."""
    import smtplib

    setup = admin_setup
    queue_id = setup.send(["bob@example.org"], body=b"Subject: traced\r\n\r\nhi\r\n")
    host, _, port = setup.a.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10, source_address=("127.0.0.9", 0)) as s:
        s.ehlo("client.test")
        s.mail("alice@example.org")
        assert s.rcpt("nobody@example.org")[0] == 550  # refused: nothing is queued

    context = browser.new_context(viewport=DESKTOP)  # type: ignore[attr-defined]
    page = context.new_page()
    log_in(page, setup)
    page.goto(f"{setup.base}/#/message/{queue_id}")
    page.wait_for_selector("#decisions li[data-check=relay]")
    text = page.inner_text("#decisions")
    assert "rcpt · relay: continue" in text and "<bob@example.org> is a local mailbox" in text
    assert "end_of_data · authentication" in text and "spf=pass" in text
    assert f"queued as {queue_id}" in text

    page.click("nav >> text=Sessions")
    page.fill("#session-filters input[name=client]", "127.0.0.9")
    page.click("#session-filters >> text=Find")
    card = page.wait_for_selector(".session li[data-action=reject]")
    assert "nobody@example.org" in card.inner_text()
    assert "127.0.0.9" in page.inner_text("#sessions")
    shoot(page, "admin-sessions.png")
    context.close()


def test_suspend_and_resume_a_destination_on_the_dashboard(
    admin_setup: AdminSetup, browser: object
) -> None:
    """The dashboard's "Suspended destinations" card: suspend with the form, see the
    row with its reason, resume with its button (docs/shaping.md)."""
    setup = admin_setup
    context = browser.new_context(viewport=DESKTOP)  # type: ignore[attr-defined]
    page = context.new_page()
    log_in(page, setup)
    page.wait_for_selector("#suspensions:has-text('No destination is suspended')")
    page.fill("#suspend-form input[name=destination]", "remote.test")
    page.fill("#suspend-form input[name=minutes]", "30")
    page.fill("#suspend-form input[name=reason]", "their maintenance")
    page.click("#suspend-form button")
    row = page.wait_for_selector("#suspensions tr[data-destination='remote.test']")
    assert "their maintenance" in row.inner_text()
    page.click("#suspensions tr[data-destination='remote.test'] button")
    page.wait_for_selector("#suspensions:has-text('No destination is suspended')")
    context.close()
    phone = browser.new_context(viewport=PHONE, is_mobile=True)  # type: ignore[attr-defined]
    mobile = phone.new_page()
    log_in(mobile, setup)
    mobile.wait_for_selector("#suspend-form")
    assert mobile.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone.close()
