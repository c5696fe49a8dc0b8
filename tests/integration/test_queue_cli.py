"""`postillon queue ...` against the queue of a running server.

smtplib ──▶ postillon serve ──▶ queue ◀── postillon queue list/show/hold/release/delete
"""

from __future__ import annotations

import json
import smtplib
import time

import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration


def _send(server: ServerProcess, rcpt: str) -> str:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        s.ehlo("client.test")
        s.mail("carol@sender.test")
        s.rcpt(rcpt)
        code, msg = s.data(b"Subject: q\r\n\r\nbody\r\n")
    assert code == 250
    return msg.decode().rsplit(" ", 1)[1]


def test_deferred_message_shows_reply_and_can_be_held_released_deleted(make_server) -> None:  # type: ignore[no-untyped-def]
    # A relayed recipient with no outbound route stays deferred: a stable
    # queue entry to inspect from the CLI while the server runs.
    server = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        queue={"first_retry": 3600.0, "max_retry": 3600.0},
    ).start()
    qid = _send(server, "friend@unreachable.invalid")
    deadline = time.monotonic() + 20
    while True:
        shown = json.loads(server.cli("queue", "show", qid, "--json").stdout)
        state = shown["recipients"][0]["state"]
        if state == "deferred" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state == "deferred"
    assert shown["recipients"][0]["last_reply"].startswith("4")
    assert shown["recipients"][0]["next_try"]

    listed = json.loads(server.cli("queue", "list", "--json").stdout)
    assert [m["queue_id"] for m in listed] == [qid]
    table = server.cli("queue", "list").stdout
    assert qid in table and "deferred" in table

    assert "1 recipient(s) held" in server.cli("queue", "hold", qid).stdout
    assert (
        json.loads(server.cli("queue", "show", qid, "--json").stdout)["recipients"][0]["state"]
        == "held"
    )
    assert "1 recipient(s) released" in server.cli("queue", "release", qid).stdout
    assert server.cli("queue", "flush").returncode == 0
    assert "deleted" in server.cli("queue", "delete", qid).stdout
    missing = server.cli("queue", "show", qid, check=False)
    assert missing.returncode == 1 and "no message" in missing.stderr


def test_check_config_names_the_key(tmp_path, make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(limits={"recipients": 5})
    server.write_config()
    result = server.cli("check-config", str(server.config_path), check=False)
    assert result.returncode == 2
    assert "limits.recipients" in result.stderr and "100" in result.stderr
