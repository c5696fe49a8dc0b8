"""A retry wave to a dead destination does not hold up fresh mail (issue 19, target 4).

    smtplib ─▶ A (postillon) ──DNS MX──▶ B (postillon, 127.0.0.3): live.test
                             └─DNS MX──▶ 127.0.0.5, nothing listens: dead.test

A holds a backlog of messages deferred for dead.test. ``postillon queue resume
dead.test`` makes all of them due at once (their retry wave) and fresh mail to
live.test arrives at the same moment. The first refused connections suspend dead.test
again (Postfix's dead destination) and the runner postpones the rest of the wave in
the store (delivery/postpone.py): fresh mail is delivered after a few dead.test
attempts, not after the whole backlog (retries are claimed before fresh mail, so
before the change every one of them was attempted first). Counts, not times.
"""

from __future__ import annotations

import json
import os
import smtplib
import time
from typing import Any

import pytest

from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration

BACKLOG = 400
FRESH = 20
CONCURRENCY = 10
MESSAGE = b"From: alice@example.org\r\nSubject: wave\r\n\r\nhello\r\n"


def zones() -> dict[str, Any]:
    return {
        "live.test": {"@": {"MX": "10 mx.live.test"}, "mx.live.test": {"A": "127.0.0.3"}},
        "dead.test": {"@": {"MX": "10 mx.dead.test"}, "mx.dead.test": {"A": "127.0.0.5"}},
    }


def send(server: ServerProcess, rcpts: list[str]) -> list[str]:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    ids = []
    with smtplib.SMTP(host, int(port), timeout=30) as s:
        s.ehlo("client.test")
        for rcpt in rcpts:
            s.mail("alice@example.org")
            assert s.rcpt(rcpt)[0] == 250
            code, msg = s.data(MESSAGE)
            assert code == 250
            ids.append(msg.decode().rsplit(" ", 1)[1])
    return ids


def events(log: str, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if record.get("event") == name:
            found.append(record)
    return found


def attempts(log: str) -> list[dict[str, Any]]:
    """The dead.test deliveries attempted (a connection refused), not those that met
    the suspension (logged as deferred too, marked suspended)."""
    return [
        e
        for e in events(log, "deferred")
        if e.get("to", "").endswith("@dead.test") and not e.get("suspended")
    ]


def summary(server: ServerProcess) -> dict[str, Any]:
    result = server.cli("queue", "summary", "--json")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_fresh_mail_is_not_held_up_by_a_dead_destinations_retry_wave(
    make_server: Any, make_dns_server: Any
) -> None:
    dns = make_dns_server(zones())
    port = 25 if os.geteuid() == 0 else free_port("127.0.0.3")
    b = make_server(
        listen=[{"kind": "smtp", "address": f"127.0.0.3:{port}"}],
        domain=[{"name": "live.test", "mailboxes": ["bob"]}],
    )
    b.start()
    a = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={"port": port, "connect_timeout": 2.0, "tls": "none"},
        queue={"first_retry": 3600, "max_retry": 3600, "concurrency": CONCURRENCY},
        log={"format": "json", "file": "mail.log"},
    )
    a.start()

    # The backlog: every message deferred for dead.test, waiting an hour.
    send(a, [f"u{i}@dead.test" for i in range(BACKLOG)])

    def settled() -> bool:
        states = summary(a)["by_state"]
        return bool(states["deferred"] == BACKLOG and states["leased"] == states["pending"] == 0)

    wait_until(settled, 90, "the backlog to be deferred")
    seeded = a.maillog()
    attempted_while_seeding = len(attempts(seeded))
    # The first refusals suspended dead.test; the rest were postponed, not attempted.
    assert attempted_while_seeding < BACKLOG / 2, attempted_while_seeding

    # The wave: every dead.test record due now, and fresh mail at the same moment.
    resumed = a.cli("queue", "resume", "dead.test")
    assert f"{BACKLOG} recipient(s) due now" in resumed.stdout, resumed.stdout
    fresh = send(a, ["bob@live.test" for _ in range(FRESH)])

    def fresh_delivered() -> bool:
        done = {e["queue_id"] for e in events(a.maillog(), "delivered")}
        return all(q in done for q in fresh)

    wait_until(fresh_delivered, 90, "the fresh mail")
    log = a.maillog()[len(seeded) :]
    wave_attempts = attempts(log)
    # A few connections were refused (the deliveries in flight when the first one
    # failed), then the wave was postponed: fresh mail did not wait for the backlog.
    assert len(wave_attempts) <= 3 * CONCURRENCY, len(wave_attempts)
    assert len(b.wait_for_mail("bob@live.test", FRESH)) == FRESH
    assert "postponed" in a.maillog()
    # Nothing lost: the whole backlog is still queued, deferred for later.
    wait_until(settled, 60, "the wave to be deferred again")
    shape = {row["domain"]: row for row in summary(a)["by_domain"]}
    assert shape["dead.test"]["total"] == BACKLOG
