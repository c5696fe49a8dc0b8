"""pytest fixture: Postfix's smtp-sink, a real minimal SMTP/LMTP server.

``sink(*options, unix=False)`` starts one (127.0.0.1 on a free port, or a unix
socket) that dumps every transaction to a file; ``Sink.dumps(n)`` reads them.
Options are smtp-sink's own (see ``man smtp-sink``: -L for LMTP, -Q/-q to
drop the connection after a command, -a to hide AUTH, ...).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.ports import free_port

SMTP_SINK = "/usr/sbin/smtp-sink"


class Sink:
    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, dump: Path, unix: str | None
    ) -> None:
        self.proc = proc
        self.port = port
        self.dump = dump
        self.unix = unix

    def dumps(self, count: int, timeout: float = 5.0) -> list[str]:
        """The dump files' texts (waits until ``count`` exist), oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(self.dump.rglob("*"), key=lambda p: p.stat().st_mtime_ns)
            files = [f for f in files if f.is_file()]
            if len(files) >= count or time.monotonic() > deadline:
                return [f.read_bytes().decode("utf-8", "replace") for f in files]
            time.sleep(0.05)


def _wait_listening(port: int | None, unix: str | None) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if unix:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(unix)
            else:
                socket.create_connection(("127.0.0.1", port or 0), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("smtp-sink did not start")


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.fail("smtp-sink is missing: run scripts/install-system-deps.sh (package postfix)")
    procs: list[subprocess.Popen[bytes]] = []
    # smtp-sink run by root must drop to another user (-u), which must be able to
    # write the dump directory: pytest's own tmp_path is private to root.
    shared = Path(tempfile.mkdtemp(prefix="postillon-sink-"))
    shared.chmod(0o777)

    def start(*options: str, unix: bool = False) -> Sink:
        dump = shared / f"dump{len(procs)}"
        dump.mkdir()
        dump.chmod(0o777)
        port = free_port()
        path = str(tmp_path / f"lmtp{len(procs)}.sock") if unix else None
        where = f"unix:{path}" if path else f"127.0.0.1:{port}"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        proc = subprocess.Popen([SMTP_SINK, *user, "-d", f"{dump}/%M.", *options, where, "10"])
        procs.append(proc)
        _wait_listening(port, path)
        return Sink(proc, port, dump, path)

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
    shutil.rmtree(shared, ignore_errors=True)
