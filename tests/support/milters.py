"""Real milters for tests: libmilter's reference (pymilter), rspamd, OpenDKIM, ClamAV.

Each harness runs its program in the foreground from a fresh temporary directory, in a
process group of its own, listening on loopback only (``127.0.0.1:<free port>``), and
stops it (SIGTERM, then SIGKILL) on ``stop()`` / leaving ``with``. ``address`` is the
``[[milter]] address`` to give postillon. Notes from running them by hand are in
``shared/notes/test-components.md``; the pitfalls each class handles are in its note.

If a program is not installed the harness raises ``MilterNotInstalled`` naming the Debian
package (``scripts/install-system-deps.sh`` installs them); the fixtures turn that into a
failure, not a skip, as the Dovecot and PostgreSQL fixtures do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from support.ports import free_port, stop_process, wait_until

HERE = Path(__file__).resolve().parent


class MilterNotInstalled(RuntimeError):
    pass


class _Harness:
    program = ""
    package = ""
    # Seconds to wait for the port to answer the milter negotiation.
    start_timeout = 30.0

    def __init__(self) -> None:
        if not Path(self.program).exists():
            raise MilterNotInstalled(
                f"{self.program} is missing: install the Debian package {self.package} "
                "(scripts/install-system-deps.sh)"
            )
        self.dir = Path(tempfile.mkdtemp(prefix=f"milter-{type(self).__name__.lower()}-"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "output.log"

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write the configuration into ``self.dir``."""

    def start(self) -> _Harness:
        self.prepare()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_until(self._ready, self.start_timeout, f"{type(self).__name__} on {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.program} exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
            )
        return negotiates("127.0.0.1", self.port)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            pgid = self.proc.pid
            stop_process(self.proc, signal.SIGTERM, timeout=15)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def negotiates(host: str, port: int) -> bool:
    """Whether a milter on ``host:port`` answers SMFIC_OPTNEG (the port alone may
    accept before the milter is ready: rspamd's proxy does)."""
    import socket
    import struct

    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(struct.pack(">IcIII", 13, b"O", 6, 0x1FF, 0x1FFFFF & ~0x800))
            head = s.recv(5)
            ok = len(head) == 5 and head[4:5] == b"O"
            s.sendall(struct.pack(">Ic", 1, b"Q"))
            return ok
    except OSError:
        return False


class ReferenceMilter(_Harness):
    """``reference_milter.py`` on libmilter (see its docstring for what it does)."""

    program = "/usr/bin/python3"
    package = "python3-milter"
    start_timeout = 15.0

    def __init__(self) -> None:
        try:
            super().__init__()
        finally:
            pass
        check = subprocess.run([self.program, "-c", "import Milter"], capture_output=True)
        if check.returncode != 0:
            raise MilterNotInstalled(
                "pymilter is missing: install the Debian package python3-milter"
            )
        self.record = self.dir / "record.jsonl"

    def command(self) -> list[str]:
        return [
            self.program,
            str(HERE / "reference_milter.py"),
            f"inet:{self.port}@127.0.0.1",
            str(self.record),
        ]

    def records(self) -> list[dict[str, Any]]:
        """What the milter saw, one dict per message that reached end of message."""
        try:
            lines = self.record.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def wait_records(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return wait_until(
            lambda: (r := self.records()) and len(r) >= count and r, timeout, "milter records"
        )


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
