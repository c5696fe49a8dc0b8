"""A full spool disk during DATA/BDAT: 452 4.3.1 and a log line, never a reset.

    smtplib / raw BDAT ──▶ postillon serve ──▶ spool (a 1 MiB tmpfs, in the server's
                                                own mount namespace) ──X ENOSPC
                           452 4.3.1 ◀──┘ the session goes on: RSET, next message 250

The server runs under ``unshare -m`` with a tiny tmpfs mounted on its spool directory,
so a message larger than the tmpfs fills the disk in the middle of the body, exactly
where a real full disk would; nothing else of the machine is touched.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration

STORAGE_FULL = (452, b"4.3.1")
SPOOL_SIZE = 1024 * 1024


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    target = tmp_path / "probe"
    target.mkdir()
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {target}"],
        capture_output=True,
    )
    return probe.returncode == 0


def _small_spool_python(tmp_path: Path, spool: Path) -> Path:
    """A stand-in for the Python executable that runs it in a private mount namespace
    with a SPOOL_SIZE tmpfs on ``spool``."""
    script = tmp_path / "python-small-spool"
    script.write_text(
        "#!/bin/sh\n"
        "set -e\n"
        'if [ -z "$SMALL_SPOOL_NS" ]; then\n'
        '    SMALL_SPOOL_NS=1 exec unshare -m "$0" "$@"\n'
        "fi\n"
        "mount --make-rprivate /\n"
        f"mkdir -p '{spool}'\n"
        f"mount -t tmpfs -o size={SPOOL_SIZE},mode=0700 tmpfs '{spool}'\n"
        f"exec '{sys.executable}' \"$@\"\n"
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def small_spool_server(
    make_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ServerProcess:  # type: ignore[no-untyped-def]
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs root and mount namespaces (unshare -m) for a small tmpfs spool")
    server: ServerProcess = make_server()
    python = _small_spool_python(tmp_path, server.data_dir / "spool")
    monkeypatch.setattr(sys, "executable", str(python))
    return server.start()


def _message(size: int) -> str:
    return "Subject: big\r\n\r\n" + ("x" * 998 + "\r\n") * (size // 1000)


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_full_spool_during_data_is_452_and_the_session_goes_on(
    small_spool_server: ServerProcess,
) -> None:
    server = small_spool_server
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=30) as s:
        s.ehlo()
        assert s.mail("carol@sender.test")[0] == 250
        assert s.rcpt("alice@example.org")[0] == 250
        code, text = s.data(_message(3 * SPOOL_SIZE))  # larger than the whole spool disk
        assert (code, text[:5]) == STORAGE_FULL
        assert s.rset()[0] == 250
        # The failed message's spool file is gone: a message that needs the spool
        # disk (over 256 KiB) fits again, in the same session.
        s.sendmail("carol@sender.test", ["alice@example.org"], _message(SPOOL_SIZE // 2))
    server.wait_for_mail("alice@example.org")
    log = server.wait_for_log("spool write failed")
    assert "spool write failed: No space left on device" in log
    assert "452 4.3.1" in log


def test_full_spool_during_bdat_is_452(small_spool_server: ServerProcess) -> None:
    server = small_spool_server
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    body = _message(3 * SPOOL_SIZE).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        assert _read_reply(sock).startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        assert b"CHUNKING" in _read_reply(sock)
        sock.sendall(b"MAIL FROM:<carol@sender.test>\r\nRCPT TO:<alice@example.org>\r\n")
        replies = b""
        while replies.count(b"\r\n") < 2:
            replies += sock.recv(4096)
        assert replies.startswith(b"250") and b"\r\n250" in replies
        sock.sendall(b"BDAT %d LAST\r\n" % len(body) + body)
        assert _read_reply(sock).startswith(b"452 4.3.1")
        sock.sendall(b"NOOP\r\n")
        assert _read_reply(sock).startswith(b"250")
