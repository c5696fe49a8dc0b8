"""The admin JSON API over real HTTP (aiohttp client) against a running postillon.

smtplib ──▶ A ──smtp:[127.0.0.1]:Q──▶ B (down, then up) ──▶ Maildir
            │
aiohttp ───▶ A's admin server (127.0.0.1:P, Bearer token)
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import aiohttp
import pytest
import trustme

from admin_fixtures import AdminSetup, wait_port
from support.ports import free_port

pytestmark = pytest.mark.integration


async def get(
    http: aiohttp.ClientSession, setup: AdminSetup, path: str, status: int = 200, **params: Any
) -> Any:
    async with http.get(setup.base + path, headers=setup.auth, params=params) as r:
        assert r.status == status, await r.text()
        return await r.json()


async def post(http: aiohttp.ClientSession, setup: AdminSetup, path: str, status: int = 200) -> Any:
    async with http.post(setup.base + path, headers=setup.auth) as r:
        assert r.status == status, await r.text()
        return await r.json()


async def wait_state(
    http: aiohttp.ClientSession, setup: AdminSetup, queue_id: str, state: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        async with http.get(f"{setup.base}/api/queue/messages/{queue_id}", headers=setup.auth) as r:
            shown: dict[str, Any] = await r.json()
            if r.status == 200 and shown["state"] == state:
                return shown
        assert time.monotonic() < deadline, f"{queue_id} never {state}: {shown}"
        await asyncio.sleep(0.1)


async def test_token_required_everywhere_but_healthz(admin_setup: AdminSetup) -> None:
    setup = admin_setup
    async with aiohttp.ClientSession() as http:
        async with http.get(setup.base + "/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        for path in ("/api/status", "/api/queue/summary", "/api/openapi.json"):
            async with http.get(setup.base + path) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert "token" in (await r.json())["error"]
            bad = {"Authorization": "Bearer " + "x" * 43}
            async with http.get(setup.base + path, headers=bad) as r:
                assert r.status == 401
        async with http.post(setup.base + "/api/queue/flush") as r:
            assert r.status == 401
        status = await get(http, setup, "/api/status")
        assert status["hostname"] == "mx.test.example"
        assert [lst["kind"] for lst in status["listeners"]] == ["smtp"]
        assert status["uptime_seconds"] >= 0
        spec = await get(http, setup, "/api/openapi.json")
        assert spec["openapi"].startswith("3.")
        # A new token replaces the old one at once, without a restart.
        new_token = setup.a.cli("admin", "token").stdout.strip()
        async with http.get(setup.base + "/api/status", headers=setup.auth) as r:
            assert r.status == 401
        setup.token = new_token
        await get(http, setup, "/api/status")


async def test_deferred_message_inspected_retried_and_delivered(admin_setup: AdminSetup) -> None:
    setup = admin_setup
    queue_id = setup.send(["bob@remote.test", "carol@remote.test"])
    setup.wait_log(f"{queue_id}: deferred: to=<carol@remote.test>")
    async with aiohttp.ClientSession() as http:
        summary = await get(http, setup, "/api/queue/summary")
        assert summary["messages"] == 1 and summary["oldest_queue_id"] == queue_id
        (row,) = summary["by_domain"]
        assert row["domain"] == "remote.test" and row["by_state"] == {"deferred": 2}
        assert row["by_age"][0] == 2  # both under 5 minutes old

        page = await get(http, setup, "/api/queue/messages", state="deferred", domain="remote.test")
        assert page["total"] == 1 and page["messages"][0]["queue_id"] == queue_id
        for params in (
            {"state": "held"},
            {"domain": "elsewhere.test"},
            {"sender": "<>"},
            {"recipient": "nobody"},
            {"min_age": "3600"},
        ):
            assert (await get(http, setup, "/api/queue/messages", **params))["total"] == 0
        assert (await get(http, setup, "/api/queue/messages", sender="ALICE"))["total"] == 1
        assert (await get(http, setup, "/api/queue/messages", max_age="3600"))["total"] == 1
        paged = await get(http, setup, "/api/queue/messages", offset="1", limit="1")
        assert paged["total"] == 1 and paged["messages"] == []
        await get(http, setup, "/api/queue/messages", 400, state="lost")
        await get(http, setup, "/api/queue/messages", 400, limit="0")
        await get(http, setup, "/api/queue/messages", 400, min_age="soon")

        shown = await get(http, setup, f"/api/queue/messages/{queue_id}")
        assert shown["subject"] == "Quarterly report"
        assert shown["sender"] == "alice@example.org"
        assert {r["state"] for r in shown["recipients"]} == {"deferred"}
        assert all(r["last_reply"].startswith("4") for r in shown["recipients"])
        assert all(r["attempts"] == 1 and r["next_try"] for r in shown["recipients"])
        names = [h["name"] for h in shown["headers"]]
        # the checks' verdict first, then our trace header, then the client's
        assert names[:2] == ["Authentication-Results", "Received"] and "Message-ID" in names

        async with http.get(
            f"{setup.base}/api/queue/messages/{queue_id}/raw", headers=setup.auth
        ) as r:
            assert r.status == 200 and r.content_type == "message/rfc822"
            raw = await r.read()
        assert raw.startswith(b"Authentication-Results: mx.test.example;")
        assert b"\r\nReceived: " in raw and raw.endswith(b"Numbers attached.\r\n")

        history = await get(http, setup, f"/api/queue/messages/{queue_id}/events")
        kinds = [e["event"] for e in history["events"]]
        # the inbound checks, then the commit, then one attempt per recipient
        assert kinds[:2] == ["authentication", "received"] and kinds.count("deferred") == 2
        assert "spf=pass" in history["events"][0]["fields"]["results"]
        received = history["events"][1]["fields"]
        assert received["from"] == "alice@example.org" and "127.0.0.1" in received["client"]

        # Retrying while the destination is still down: a new deferral.
        assert (await post(http, setup, f"/api/queue/messages/{queue_id}/retry"))["recipients"] == 2
        setup.b.start()
        await post(http, setup, f"/api/queue/messages/{queue_id}/retry")
        setup.b.wait_for_mail("bob@remote.test")
        setup.b.wait_for_mail("carol@remote.test")
        deadline = time.monotonic() + 20
        while True:
            async with http.get(
                f"{setup.base}/api/queue/messages/{queue_id}", headers=setup.auth
            ) as r:
                if r.status == 404:
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        history = await get(http, setup, f"/api/queue/messages/{queue_id}/events")
        assert history["in_queue"] is False
        kinds = [e["event"] for e in history["events"]]
        assert kinds.count("delivered") == 2 and "operator" in kinds
        delivered = next(e for e in history["events"] if e["event"] == "delivered")
        assert delivered["fields"]["status"].startswith("250")

        activity = await get(http, setup, "/api/activity", hours="1", bucket_minutes="5")
        assert sum(activity["series"]["received"]) >= 1
        assert sum(activity["series"]["delivered"]) == 2
        assert sum(activity["series"]["deferred"]) >= 2
        assert len(activity["buckets"]) == 12
        await get(http, setup, "/api/activity", 400, hours="0")


async def test_hold_release_bounce_and_delete(admin_setup: AdminSetup) -> None:
    setup = admin_setup
    bounced = setup.send(["bob@remote.test"])
    deleted = setup.send(["carol@remote.test"])
    setup.wait_log(f"{bounced}: deferred:")
    setup.wait_log(f"{deleted}: deferred:")
    async with aiohttp.ClientSession() as http:
        base = "/api/queue/messages/"
        assert (await post(http, setup, base + bounced + "/hold"))["recipients"] == 1
        await post(http, setup, base + bounced + "/hold", 409)  # nothing left to hold
        await post(http, setup, base + bounced + "/retry", 409)  # held: release first
        assert (await wait_state(http, setup, bounced, "held"))["recipients"][0]["state"] == "held"
        assert (await post(http, setup, base + bounced + "/release"))["recipients"] == 1
        await post(http, setup, base + bounced + "/release", 409)
        # Release makes it due now: wait for that retry's deferral, or the bounce
        # below may find the recipient leased mid-delivery (409, nothing to bounce).
        deadline = time.monotonic() + 20
        while setup.a.maillog().count(f"{bounced}: deferred:") < 2:
            assert time.monotonic() < deadline, setup.a.maillog()[-3000:]
            await asyncio.sleep(0.1)

        # Released, it is due at once: a delivery the runner started meanwhile lands
        # first (409 "nothing left to bounce" while it is in flight; it stays held).
        deadline = time.monotonic() + 10
        while True:
            async with http.post(setup.base + base + bounced + "/bounce", headers=setup.auth) as r:
                if r.status != 409 or time.monotonic() > deadline:
                    assert r.status == 200, await r.text()
                    result = await r.json()
                    break
            await asyncio.sleep(0.1)
        assert result == {"queue_id": bounced, "action": "bounce", "recipients": 1}
        # The sender, a local mailbox of A, gets a delivery status notification.
        (notice,) = setup.a.wait_for_mail("alice@example.org")
        text = notice.read_text()
        assert "Undelivered Mail Returned to Sender" in text
        assert "Returned to sender by the postmaster" in text and "bob@remote.test" in text
        await get(http, setup, base + bounced, 404)
        history = await get(http, setup, base + bounced + "/events")
        actions = [e["fields"].get("action") for e in history["events"] if e["event"] == "operator"]
        assert actions == ["hold", "release", "bounce"]
        assert any(e["event"] == "bounce" for e in history["events"])

        assert (await post(http, setup, base + deleted + "/delete"))["recipients"] == 1
        await get(http, setup, base + deleted, 404)
        await post(http, setup, base + deleted + "/delete", 404)
        await post(http, setup, base + deleted + "/explode", 404)
        await get(http, setup, base + "not-a-queue-id", 400)
        await get(http, setup, base + "0123456789ABCDEFG/raw", 404)
        await get(http, setup, base + "0123456789ABCDEFG/events", 404)
        assert (await post(http, setup, "/api/queue/flush"))["action"] == "flush"


def test_non_loopback_admin_without_tls_is_refused(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(admin={"listen": "0.0.0.0:8025"})
    server.write_config()
    result = server.cli("check-config", str(server.config_path), check=False)
    assert result.returncode == 2
    assert "admin.listen" in result.stderr and "tls_cert" in result.stderr
    tls_ok = make_server(admin={"listen": "0.0.0.0:8025", "tls_from_server": True})
    tls_ok.write_config()
    assert tls_ok.cli("check-config", str(tls_ok.config_path)).returncode == 0


async def test_admin_over_tls_with_its_own_certificate(make_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "admin.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "admin.key"))
    port = free_port()
    server = make_server(
        admin={
            "listen": f"127.0.0.1:{port}",
            "tls_cert": str(tmp_path / "admin.pem"),
            "tls_key": str(tmp_path / "admin.key"),
        }
    ).start()
    wait_port(port)
    token = server.cli("admin", "token").stdout.strip()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with aiohttp.ClientSession() as http:
        url = f"https://127.0.0.1:{port}"
        async with http.get(f"{url}/api/status", ssl=client) as r:
            assert r.status == 401
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(f"{url}/api/status", ssl=client, headers=headers) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientError):  # no plain HTTP on a TLS port
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                await r.read()


async def test_suspend_and_resume_a_destination_over_the_api(admin_setup: AdminSetup) -> None:
    """POST /api/queue/suspensions, the summary and the list show it (reason, end),
    DELETE lifts it; bad input is a 400 naming what is wrong."""
    setup = admin_setup
    async with aiohttp.ClientSession() as http:
        body = {"destination": "Example.NET", "seconds": 600, "reason": "their maintenance"}
        async with http.post(
            setup.base + "/api/queue/suspensions", headers=setup.auth, json=body
        ) as r:
            assert r.status == 200, await r.text()
            made = await r.json()
        assert made["destination"] == "example.net" and made["by_operator"] is True
        assert 590 <= made["remaining_seconds"] <= 600
        (listed,) = await get(http, setup, "/api/queue/suspensions")
        assert listed["reason"] == "their maintenance" and listed["until"] == made["until"]
        summary = await get(http, setup, "/api/queue/summary")
        assert [s["destination"] for s in summary["suspensions"]] == ["example.net"]
        for bad in ({"seconds": 10}, {"destination": "a b"}, {"destination": "x", "seconds": 0}):
            async with http.post(
                setup.base + "/api/queue/suspensions", headers=setup.auth, json=bad
            ) as r:
                assert r.status == 400, bad
                assert (await r.json())["error"]
        async with http.delete(
            setup.base + "/api/queue/suspensions/example.net", headers=setup.auth
        ) as r:
            assert r.status == 200 and (await r.json())["resumed"] is True
        async with http.delete(
            setup.base + "/api/queue/suspensions/example.net", headers=setup.auth
        ) as r:
            assert r.status == 404
        assert await get(http, setup, "/api/queue/suspensions") == []
        spec = await get(http, setup, "/api/openapi.json")
        assert "/api/queue/suspensions/{destination}" in spec["paths"]
