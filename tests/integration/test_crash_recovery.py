"""kill -9 in the middle of a load: every message that got its 250 is
delivered exactly once after restart, none is lost.

    8 smtplib clients ──▶ postillon serve ──▶ queue ──▶ Maildir
                              X SIGKILL mid-load, then restart on the same data_dir
"""

from __future__ import annotations

import re
import smtplib
import threading
import time
from collections import Counter

import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration

CLIENTS = 8
PER_CLIENT = 300  # 2,400 messages in all
KILL_AFTER = 800  # acknowledged messages before the SIGKILL


def test_kill_9_loses_nothing(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server().start()
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    acked: set[str] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def client(n: int) -> None:
        i = 0
        while i < PER_CLIENT and not killed.is_set():
            try:
                with smtplib.SMTP(host, int(port), timeout=10) as s:
                    while i < PER_CLIENT:
                        token = f"c{n}-m{i}"
                        body = f"Subject: crash {token}\r\nX-Token: {token}\r\n\r\n" + "x" * 4000
                        s.sendmail("load@sender.test", ["alice@example.org"], body)
                        with lock:
                            acked.add(token)
                        i += 1
            except (OSError, smtplib.SMTPException):
                if killed.is_set():
                    return
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    while len(acked) < KILL_AFTER:
        time.sleep(0.01)
    server.kill()
    killed.set()
    for t in threads:
        t.join(30)
    acked_at_kill = set(acked)

    server.start()
    deadline = time.monotonic() + 120
    tokens: Counter[str] = Counter()
    while time.monotonic() < deadline:
        tokens = Counter()
        for path in server.maildir_messages("alice@example.org"):
            m = re.search(rb"X-Token: (\S+)", path.read_bytes())
            assert m is not None
            tokens[m.group(1).decode()] += 1
        queued = server.cli("queue", "list", "--json").stdout
        if acked_at_kill <= set(tokens) and queued.strip() == "[]":
            break
        time.sleep(0.5)
    missing = acked_at_kill - set(tokens)
    duplicates = {t: c for t, c in tokens.items() if c > 1}
    print(
        f"acked before kill: {len(acked_at_kill)}, delivered: {len(tokens)}, "
        f"duplicates: {len(duplicates)}, missing: {len(missing)}"
    )
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    assert not duplicates, f"delivered twice: {duplicates}"
