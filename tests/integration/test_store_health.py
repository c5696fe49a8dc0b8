"""Store health (issue 18, item 11): when the SQLite writer thread dies, /healthz
says 503 with the reason and the server exits non-zero, logged, so a supervisor
restarts it; the restarted server has every message.

    test ──SMTP──▶ postillon serve ──▶ SQLite queue (writer thread)
         ──HTTP──▶ /healthz                    ✗ killed by fault injection

The fault is injected from outside the package: a ``sitecustomize`` module on the
server's PYTHONPATH makes the writer's next batch raise a ``BaseException`` once a
trigger file exists (what a bug in the writer thread would do).
"""

from __future__ import annotations

import json
import os
import smtplib
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support.ports import free_port
from support.server import ServerProcess, default_config

pytestmark = pytest.mark.integration

_SITECUSTOMIZE = textwrap.dedent(
    """
    import os

    _TRIGGER = os.environ.get("POSTILLON_TEST_KILL_WRITER")
    if _TRIGGER:
        from postillon.queue import sqlite_writer

        class WriterKilled(BaseException):
            pass

        _original = sqlite_writer.GroupCommitWriter._run_batch

        def _run_batch(self, conn, ops):
            if os.path.exists(_TRIGGER):
                raise WriterKilled("fault injected by the test")
            return _original(self, conn, ops)

        sqlite_writer.GroupCommitWriter._run_batch = _run_batch
    """
)


def _healthz(port: int) -> tuple[int, dict[str, object]] | None:
    """(status, JSON body), or None when nothing listens any more."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return None


def _wait_healthz(port: int, timeout: float = 20.0) -> int:
    """The /healthz status once the admin server answers (it starts after SMTP)."""
    deadline = time.monotonic() + timeout
    while (answer := _healthz(port)) is None:
        assert time.monotonic() < deadline, "the admin server did not answer"
        time.sleep(0.05)
    return answer[0]


def _send(server: ServerProcess, rcpt: str) -> None:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=20) as smtp:
        smtp.sendmail("someone@remote.test", [rcpt], b"Subject: health\r\n\r\nhi\r\n")


def test_dead_writer_gives_503_and_a_clean_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    trigger = tmp_path / "kill-writer"
    path = [str(inject), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.setenv("POSTILLON_TEST_KILL_WRITER", str(trigger))
    admin = free_port()
    root = tmp_path / "srv"
    root.mkdir()
    server = ServerProcess(root, default_config(root, admin={"listen": f"127.0.0.1:{admin}"}))
    server.start()
    try:
        _send(server, "alice@example.org")
        server.wait_for_mail("alice@example.org")
        assert _wait_healthz(admin) == 200

        trigger.touch()  # the runner's next claim (within a second) kills the writer
        refused: list[tuple[int, dict[str, object]]] = []
        deadline = time.monotonic() + 30
        assert server.proc is not None
        while server.proc.poll() is None:
            answer = _healthz(admin)
            if answer is not None and answer[0] != 200:
                refused.append(answer)
            assert time.monotonic() < deadline, "the server did not exit"
            time.sleep(0.05)
        assert refused, "no 503 before the exit"
        status, body = refused[0]
        assert status == 503
        assert body["status"] == "queue unavailable"
        assert "writer thread died" in str(body["reason"])
        assert server.proc.returncode == 1
        assert "the queue store cannot recover" in server.maillog()
        assert "postillon: the queue store failed: queue writer thread died" in server.stderr()
    finally:
        server.stop()

    # A supervisor restarts it: the queue file is intact and mail flows again.
    trigger.unlink()
    server.start()
    try:
        assert _wait_healthz(admin) == 200
        _send(server, "bob@example.org")
        server.wait_for_mail("bob@example.org")
    finally:
        server.stop()
