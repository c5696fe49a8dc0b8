"""``postillon queue ...`` does what the admin API does (same operations, same JSON).

smtplib ──▶ A ──smtp:[127.0.0.1]:Q──▶ B (down, then up)
            ▲            ▲
postillon queue ...      aiohttp (admin API)   — both on the same running A
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from admin_fixtures import AdminSetup

pytestmark = pytest.mark.integration


def api(setup: AdminSetup, path: str) -> Any:
    request = urllib.request.Request(setup.base + path, headers=setup.auth)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def cli_json(setup: AdminSetup, *args: str) -> Any:
    return json.loads(setup.a.cli("queue", *args, "--json").stdout)


def test_cli_commands_match_the_api(admin_setup: AdminSetup) -> None:
    setup = admin_setup
    retried = setup.send(["bob@remote.test", "carol@remote.test"])
    bounced = setup.send(["carol@remote.test"], sender="bob@example.org")
    setup.wait_log(f"{bounced}: deferred:")
    setup.wait_log(f"{retried}: deferred: to=<carol@remote.test>")

    # summary / qshape: the same numbers as the API
    summary = cli_json(setup, "summary")
    from_api = api(setup, "/api/queue/summary")
    assert summary["by_state"] == from_api["by_state"]
    assert (
        [(d["domain"], d["total"], d["by_state"]) for d in summary["by_domain"]]
        == [(d["domain"], d["total"], d["by_state"]) for d in from_api["by_domain"]]
        == [("remote.test", 3, {"deferred": 3})]
    )
    table = setup.a.cli("queue", "qshape").stdout
    assert "remote.test" in table and "3 queued recipient(s)" in table

    # list with filters: the same messages as the API
    for cli_args, query, expected in (
        (
            ("--domain", "remote.test", "--recipient", "BOB"),
            "domain=remote.test&recipient=BOB",
            [retried],
        ),
        (("--sender", "bob@", "--newer-than", "10m"), "sender=bob@&max_age=600", [bounced]),
        (("--older-than", "1h", "--state", "deferred"), "min_age=3600&state=deferred", []),
    ):
        listed = [m["queue_id"] for m in cli_json(setup, "list", *cli_args)]
        page = api(setup, f"/api/queue/messages?{query}")
        assert listed == [m["queue_id"] for m in page["messages"]] == expected, cli_args
    bad = setup.a.cli("queue", "list", "--older-than", "soon", check=False)
    assert bad.returncode == 2 and "not a duration" in bad.stderr

    # show: envelope, headers and the history table
    shown = cli_json(setup, "show", retried)
    assert shown["recipients"] == api(setup, f"/api/queue/messages/{retried}")["recipients"]
    assert {"name": "Subject", "value": "Quarterly report"} in shown["headers"]
    text = setup.a.cli("queue", "show", retried).stdout
    assert "Quarterly report" in text and "History" in text and "deferred" in text

    # raw: the stored message, byte for byte as the API serves it
    raw = setup.a.cli("queue", "raw", retried).stdout
    assert raw.startswith("Authentication-Results: ") and "\nReceived: " in raw
    assert raw.endswith("Numbers attached.\n")

    # retry, with the destination up: delivered, and the history says so
    setup.b.start()
    result = cli_json(setup, "retry", retried)
    assert result == [{"queue_id": retried, "action": "retry", "recipients": 2}]
    setup.b.wait_for_mail("carol@remote.test")
    setup.wait_log(f"{retried}: delivered: to=<carol@remote.test>")
    deadline = time.monotonic() + 20
    while True:
        events = cli_json(setup, "events", retried)
        kinds = [e["event"] for e in events["events"]]
        if kinds.count("delivered") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert kinds[:2] == ["authentication", "received"] and kinds.count("delivered") == 2
    assert {"action": "retry", "by": "cli", "recipients": 2}.items() <= next(
        e["fields"] for e in events["events"] if e["event"] == "operator"
    ).items()
    assert events == api(setup, f"/api/queue/messages/{retried}/events")
    assert "delivered" in setup.a.cli("queue", "events", retried).stdout

    # bounce from the command line: the sender gets the notice
    out = setup.a.cli("queue", "bounce", bounced).stdout
    assert f"{bounced}: 1 recipient(s) bounced to the sender" in out
    (notice,) = setup.a.wait_for_mail("bob@example.org")
    assert "Returned to sender by the postmaster" in notice.read_text()
    missing = setup.a.cli("queue", "hold", bounced, check=False)
    assert missing.returncode == 1 and "no message" in missing.stderr
    assert cli_json(setup, "list") == []
