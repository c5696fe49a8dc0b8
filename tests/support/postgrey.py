"""Run Debian's real ``postgrey`` (a Postfix policy server) for tests: loopback, temp dir.

``Postgrey(delay=2)`` starts ``/usr/sbin/postgrey`` in the foreground in its own process
group, listening on ``127.0.0.1:<free port>``, with its Berkeley DB files and empty
client/recipient whitelists in a fresh temporary directory (so nothing under /etc or
/var/lib is read for state or written). Run as root it stays root (``--user``/``--group``
of the current user: postgrey otherwise switches to a ``postgrey`` user that cannot write
the temp dir). ``start()`` returns once the port accepts; ``stop()`` sends SIGTERM to the
group and waits. ``address`` is the ``[[policy_service]] address`` to configure.

If postgrey is not installed, ``PostgreyNotInstalled`` names the package and
``scripts/install-system-deps.sh``.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from support.ports import free_port

POSTGREY = "/usr/sbin/postgrey"


class PostgreyNotInstalled(RuntimeError):
    pass


class Postgrey:
    def __init__(self, *, delay: int = 2, auto_whitelist: int = 0) -> None:
        if not os.access(POSTGREY, os.X_OK):
            raise PostgreyNotInstalled(
                "postgrey is not installed: apt-get install postgrey"
                " (scripts/install-system-deps.sh)"
            )
        self.delay = delay
        self.auto_whitelist = auto_whitelist
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="postgrey-"))
        self.log_path = self.dir / "postgrey.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> Postgrey:
        for name in ("whitelist_clients", "whitelist_recipients"):
            (self.dir / name).write_text("")
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        args = [
            POSTGREY,
            f"--inet=127.0.0.1:{self.port}",
            f"--dbdir={self.dir}",
            f"--delay={self.delay}",
            f"--user={user}",
            f"--group={group}",
            f"--whitelist-clients={self.dir / 'whitelist_clients'}",
            f"--whitelist-recipients={self.dir / 'whitelist_recipients'}",
            f"--auto-whitelist-clients={self.auto_whitelist}",
            "--hostname=postgrey.test",
            "-v",
        ]
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgrey exited: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgrey did not listen within 20 s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Postgrey:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
