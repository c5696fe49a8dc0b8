"""The operator's TLS view on the admin server, with real parts: a real ``postillon
serve`` relays over STARTTLS to recording receivers, fetches an MTA-STS policy from a
real HTTPS host, and the admin API (and, in the browser test, the page in Chromium)
shows the TLS of each recipient's last attempt and the TLS per destination.

    smtplib ──▶ A ──MX (test DNS)──▶ wrong.mx.test 127.0.0.3  test CA, certificate for another name
                │               └──▶ good.mx.test  127.0.0.2  test CA, right name
                │  verify.test: [[tls_policy]] verify  → wrong fails, good takes it
                │  bad.test:    [[tls_policy]] verify, only wrong → deferred
                │  sts.test:    MTA-STS enforce (mx: good.mx.test) from
                │               https://mta-sts.sts.test (127.0.0.80:443) → wrong refused, good
                │  invalid.test, webpki.test, unreachable.test: publish MTA-STS; the policy
                │               is broken (.80), its host's certificate untrusted (.81), the
                │               host unreachable (.82) → delivered to good, reported so
                └─ admin 127.0.0.1:P: /api/queue/messages/…, /api/tls, /api/tls/{domain}, /metrics

Needs root (the policy host listens on :443) inside scripts/run-tests.sh's namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from admin_fixtures import wait_port
from support.https_server import Answer, HttpsServer
from support.ports import free_port
from support.recording_smtp import RecordingSmtp
from support.server import ServerProcess
from support.tls_certs import ca_issued

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the MTA-STS policy host binds :443 (root)"),
]

CHROMIUM = "/usr/bin/chromium"
FLAGS = [  # as test_admin_web.py: no network beyond loopback
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
GOOD, WRONG, WEB = "127.0.0.2", "127.0.0.3", "127.0.0.80"
UNTRUSTED_WEB, NO_WEB = "127.0.0.81", "127.0.0.82"  # a CA nobody trusts; nothing listens
STS_POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: good.mx.test\r\nmax_age: 86400\r\n"


@dataclass
class TlsWorld:
    a: ServerProcess
    base: str
    token: str
    web: HttpsServer

    def get(self, path: str) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
                status = response.status
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            body, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
        return status, json.loads(body) if "json" in kind else body.decode()


@pytest.fixture
def tls_world(make_server, make_dns_server, tmp_path: Path) -> Iterator[TlsWorld]:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port(GOOD)
    receivers = [
        RecordingSmtp(ca_issued(ca, "good.mx.test"), GOOD, "good.mx.test", port=port),
        RecordingSmtp(ca_issued(ca, "elsewhere.test"), WRONG, "wrong.mx.test", port=port),
    ]
    for rec in receivers:
        rec.start()
    web = HttpsServer(tmp_path / "web", WEB, ["mta-sts.sts.test", "mta-sts.invalid.test"])
    web.answers["/.well-known/mta-sts.txt"] = Answer(200, STS_POLICY)
    web.answers["mta-sts.invalid.test/.well-known/mta-sts.txt"] = Answer(200, b"<html>no</html>")
    untrusted = HttpsServer(tmp_path / "untrusted", UNTRUSTED_WEB, ["mta-sts.webpki.test"])
    untrusted.answers["/.well-known/mta-sts.txt"] = Answer(200, STS_POLICY)
    bundle = tmp_path / "sts-ca.pem"  # untrusted's CA is not in it
    bundle.write_bytes(web.ca_file.read_bytes() + ca.cert_pem.bytes())
    both = {"MX": ["10 wrong.mx.test", "20 good.mx.test"]}
    dns = make_dns_server(
        {
            "mx.test": {"good.mx.test": {"A": GOOD}, "wrong.mx.test": {"A": WRONG}},
            "verify.test": {"@": both},
            "bad.test": {"@": {"MX": ["10 wrong.mx.test"]}},
            "sts.test": {
                "@": both,
                "_mta-sts.sts.test": {"TXT": '"v=STSv1; id=first"'},
                "mta-sts.sts.test": {"A": WEB},
            },
            "invalid.test": {
                "@": {"MX": ["10 good.mx.test"]},
                "_mta-sts.invalid.test": {"TXT": '"v=STSv1; id=x"'},
                "mta-sts.invalid.test": {"A": WEB},
            },
            "webpki.test": {
                "@": {"MX": ["10 good.mx.test"]},
                "_mta-sts.webpki.test": {"TXT": '"v=STSv1; id=x"'},
                "mta-sts.webpki.test": {"A": UNTRUSTED_WEB},
            },
            "unreachable.test": {
                "@": {"MX": ["10 good.mx.test"]},
                "_mta-sts.unreachable.test": {"TXT": '"v=STSv1; id=x"'},
                "mta-sts.unreachable.test": {"A": NO_WEB},
            },
        }
    )
    admin_port = free_port()
    verify = {"policy": "verify", "ca_file": str(tmp_path / "ca.pem")}
    a = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={
            "port": port,
            "connect_timeout": 2.0,
            "messages_per_connection": 1,
            "sts_ca_file": str(bundle),
        },
        tls_policy=[{"domain": "verify.test", **verify}, {"domain": "bad.test", **verify}],
        tls_reports={"enabled": True, "organization": "Sender Example", "flush_interval": 0.2},
        queue={"first_retry": 3600.0, "max_retry": 3600.0},
        admin={"listen": f"127.0.0.1:{admin_port}"},
    )
    with web, untrusted:
        a.start()
        wait_port(admin_port)
        token = a.cli("admin", "token").stdout.strip()
        yield TlsWorld(a, f"http://127.0.0.1:{admin_port}", token, web)
    for rec in receivers:
        rec.stop()


def deliver_all(world: TlsWorld) -> dict[str, str]:
    """One message to each destination; queue ids by domain."""
    a = world.a
    ids = {}
    for domain, outcome in (
        ("verify.test", "delivered"),
        ("sts.test", "delivered"),
        ("bad.test", "deferred"),
    ):
        queue_id = a.send_message(f"user@{domain}")
        line = a.wait_outcome(queue_id, (outcome,))
        assert outcome in line, line
        ids[domain] = queue_id
    return ids


def wait_for(world: TlsWorld, path: str, ready: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status, body = world.get(path)
        if (status == 200 and ready(body)) or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_recipient_tls_and_tls_per_destination(tls_world: TlsWorld) -> None:
    world = tls_world
    ids = deliver_all(world)

    # A deferred recipient: the message view gives its last attempt's TLS.
    status, message = world.get(f"/api/queue/messages/{ids['bad.test']}")
    assert status == 200, message
    (rcpt,) = message["recipients"]
    tls = rcpt["tls"]
    assert tls["mx"] == "wrong.mx.test", tls
    assert tls["policy"] == "verify" and tls["result"] == "not-verified", tls
    assert tls["verified"] is False
    assert tls["version"].startswith("TLSv1."), tls
    assert tls["cipher"], tls

    # postillon queue show says the same (the shared queue operations).
    shown = json.loads(world.a.cli("queue", "show", ids["bad.test"], "--json").stdout)
    assert shown["recipients"][0]["tls"] == tls
    text = world.a.cli("queue", "show", ids["bad.test"]).stdout
    assert "not verified: not-verified (verify)" in text and "wrong.mx.test" in text, text

    # Delivered messages left the queue: their history carries the same fields.
    status, history = world.get(f"/api/queue/messages/{ids['sts.test']}/events")
    assert status == 200 and history["in_queue"] is False
    (done,) = [e for e in history["events"] if e["event"] == "delivered"]
    fields = done["fields"]
    assert fields["mx"] == "good.mx.test"
    assert fields["tls_policy"] == "mta-sts" and fields["tls_result"] == "verified", fields
    assert fields["tls_verified"] == "yes" and fields["tls_version"].startswith("TLSv1.")
    status, history = world.get(f"/api/queue/messages/{ids['verify.test']}/events")
    (done,) = [e for e in history["events"] if e["event"] == "delivered"]
    assert done["fields"]["tls_policy"] == "verify" and done["fields"]["tls_verified"] == "yes"
    # ... and the mail log line says it too.
    line = world.a.wait_outcome(ids["verify.test"], ("delivered",))
    assert "tls_policy=verify" in line and "tls_verified=yes" in line, line

    # Per destination: the TLS report counters and the MTA-STS cache.
    overview = wait_for(world, "/api/tls", lambda b: sum(d["sessions"] for d in b["domains"]) >= 5)
    assert overview["counting"] is True and len(overview["days"]) == 2
    domains = {d["domain"]: d for d in overview["domains"]}
    assert set(domains) == {"verify.test", "sts.test", "bad.test"}, domains
    verify = domains["verify.test"]
    assert verify["successful"] == 1 and verify["failed"] == 1, verify
    assert verify["results"] == {"certificate-host-mismatch": 1, "success": 1}, verify
    (failure,) = verify["failures"]
    assert failure["mx_host"] == "wrong.mx.test" and failure["receiving_ip"] == WRONG
    assert verify["mta_sts"] is None
    sts = domains["sts.test"]
    # The MX the enforce policy refused is counted under that policy (RFC 8460 §4.3).
    assert sts["policy_types"] == ["sts"], sts
    assert sts["results"] == {"success": 1, "validation-failure": 1}, sts
    assert sts["mta_sts"]["mode"] == "enforce" and sts["mta_sts"]["mx"] == ["good.mx.test"]
    assert sts["mta_sts"]["policy_id"] == "first" and sts["mta_sts"]["fresh"] is True
    assert sts["mta_sts"]["last_error"] is None

    status, one = world.get("/api/tls/STS.test.")
    assert status == 200 and one["domain"] == "sts.test" and one["mta_sts"]["mode"] == "enforce"
    assert one["counting"] is True and one["results"]["success"] == 1
    status, body = world.get("/api/tls/nowhere.test")
    assert status == 404 and "nowhere.test" in body["error"], body
    for bad in ("/api/tls/a..b", "/api/tls/%3Cscript%3E", "/api/tls?days=0", "/api/tls?days=x"):
        status, body = world.get(bad)
        assert status == 400 and body["error"], (bad, body)

    # The OpenAPI document describes both.
    status, spec = world.get("/api/openapi.json")
    assert "/api/tls" in spec["paths"] and "/api/tls/{domain}" in spec["paths"]
    assert "tls" in spec["components"]["schemas"]["Recipient"]["properties"]

    # /metrics counts sessions by policy and result.
    status, metrics = world.get("/metrics")
    assert status == 200
    assert 'postillon_outbound_tls_sessions_total{policy="verify",result="verified"} 2.0' in metrics
    assert 'postillon_outbound_tls_sessions_total{policy="verify",result="not-verified"}' in metrics
    assert (
        'postillon_outbound_tls_sessions_total{policy="verify",result="validation-failure"} 1.0'
        in metrics
    )


def test_tls_on_the_admin_page_in_chromium(tls_world: TlsWorld, tmp_path: Path) -> None:
    """The same views in a real headless Chromium: the TLS page (per destination, one
    destination's detail) and the message page's per-recipient TLS."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-system-deps.sh")
    world = tls_world
    ids = deliver_all(world)
    wait_for(world, "/api/tls", lambda b: sum(d["sessions"] for d in b["domains"]) >= 5)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(world.base + "/")
        page.fill("#token", world.token)
        page.click("text=Sign in")
        page.wait_for_selector("[data-counter=deferred] .value")

        page.click("nav >> text=TLS")
        row = page.wait_for_selector("tr[data-tls-domain='verify.test']")
        assert "certificate-host-mismatch" in row.inner_text()
        assert "MTA-STS enforce" in page.inner_text("tr[data-tls-domain='sts.test']")
        page.screenshot(path=str(tmp_path / "admin-tls.png"), full_page=True)
        page.click("tr[data-tls-domain='sts.test'] a")
        detail = page.wait_for_selector("[data-tls-detail='sts.test']")
        page.wait_for_selector("[data-mta-sts=enforce]")
        assert "good.mx.test" in page.inner_text("[data-mta-sts=enforce]")
        assert "validation-failure" in detail.inner_text()
        assert "wrong.mx.test" in page.inner_text("[data-failure=validation-failure]")

        # A queued message: its recipient's last attempt, in the recipients table.
        page.goto(f"{world.base}/#/message/{ids['bad.test']}")
        cell = page.wait_for_selector("tr[data-recipient='user@bad.test'] [data-tls=not-verified]")
        text = cell.inner_text()
        assert "not verified" in text and "policy verify" in text and "wrong.mx.test" in text
        assert "TLSv1." in text
        # A delivered one: from its history, under MTA-STS.
        page.goto(f"{world.base}/#/message/{ids['sts.test']}")
        page.wait_for_selector("[data-gone]")
        cell = page.wait_for_selector("[data-recipient='user@sts.test'] [data-tls=verified]")
        assert "policy mta-sts" in cell.inner_text() and "good.mx.test" in cell.inner_text()
        assert "policy mta-sts" in page.inner_text("[data-event=delivered] .tls-line")
        page.screenshot(path=str(tmp_path / "admin-message-tls.png"), full_page=True)
        # Nothing unknown: a domain without data says so.
        page.goto(f"{world.base}/#/tls/nowhere.test")
        page.wait_for_selector("text=Nothing is known about TLS to nowhere.test.")
        browser.close()


def test_broken_or_unreachable_mta_sts_policy_is_reported_as_such(tls_world: TlsWorld) -> None:
    """RFC 8460 §4.3.2.2: the mail goes out (no policy applies, RFC 8461 §3.3), and the
    session counts as sts-policy-invalid / sts-policy-fetch-error, not as a success
    without a policy."""
    world = tls_world
    for domain in ("invalid.test", "webpki.test", "unreachable.test"):
        line = world.a.wait_outcome(world.a.send_message(f"u@{domain}"), ("delivered",))
        assert "good.mx.test" in line, line
    overview = wait_for(world, "/api/tls", lambda b: sum(d["sessions"] for d in b["domains"]) >= 3)
    domains = {d["domain"]: d for d in overview["domains"]}
    invalid, unreachable = domains["invalid.test"], domains["unreachable.test"]
    assert invalid["results"] == {"sts-policy-invalid": 1}, invalid
    assert invalid["policy_types"] == ["sts"] and invalid["mta_sts"] is None
    assert "MTA-STS: fetching the policy of invalid.test failed" in world.a.maillog()
    assert domains["webpki.test"]["results"] == {"sts-webpki-invalid": 1}, domains
    assert unreachable["results"] == {"sts-policy-fetch-error": 1}, unreachable
    assert unreachable["failures"][0]["mx_host"] == "good.mx.test"
