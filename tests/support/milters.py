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


class Rspamd(_Harness):
    """rspamd's proxy worker in milter mode (``self_scan``), on the stock
    ``/etc/rspamd/rspamd.conf`` with its variables pointed into the temp dir.

    Pitfalls (test-components.md §4): the stock config fetches remote maps and asks
    RBLs, so DNS goes to a loopback port where nothing answers and fuzzy_check, rbl and
    asn are off; rspamd refuses to run as root without ``-u/-g``; the first start
    compiles Hyperscan databases (about 7 s), so ``DBDIR`` is kept across runs in
    ``/var/tmp/postillon-test-rspamd-db``. The milter_headers module is told to add its
    ``X-Spamd-Result``/``X-Spam-Status`` headers to every message, local or not."""

    program = "/usr/bin/rspamd"
    package = "rspamd"
    start_timeout = 90.0
    db_dir = Path("/var/tmp/postillon-test-rspamd-db")

    def prepare(self) -> None:
        conf = self.dir / "conf"
        for sub in ("local.d", "override.d"):
            (conf / sub).mkdir(parents=True)
        for sub in ("run", "log"):
            (self.dir / sub).mkdir()
        self.db_dir.mkdir(parents=True, exist_ok=True)
        dns_port = free_port()
        self.normal_port, self.controller_port = free_port(), free_port()
        files = {
            "local.d/options.inc": (
                f'dns {{ nameserver = ["127.0.0.1:{dns_port}"]; '
                "timeout = 0.2s; retransmits = 1; }\n"
                'local_addrs = "127.0.0.0/8";\n'
                # GTUBE is a test pattern: rspamd ignores it unless told otherwise.
                "enable_test_patterns = true;\n"
            ),
            "local.d/worker-proxy.inc": (
                f'bind_socket = "127.0.0.1:{self.port}";\nmilter = yes;\ntimeout = 120s;\n'
                'upstream "local" { default = yes; self_scan = yes; }\ncount = 1;\n'
            ),
            "local.d/worker-normal.inc": (
                f'bind_socket = "127.0.0.1:{self.normal_port}";\ncount = 1;\n'
            ),
            "local.d/worker-controller.inc": (
                f'bind_socket = "127.0.0.1:{self.controller_port}";\ncount = 1;\n'
            ),
            "local.d/milter_headers.conf": (
                'use = ["x-spamd-result", "x-spam-status", "x-spam-level"];\n'
                "extended_spam_headers = true;\nskip_local = false;\n"
                "skip_authenticated = false;\n"
            ),
            "local.d/logging.inc": 'type = "console";\nlevel = "info";\n',
            "override.d/fuzzy_check.conf": "enabled = false;\n",
            "override.d/rbl.conf": "enabled = false;\n",
            "override.d/asn.conf": "enabled = false;\n",
        }
        for name, text in files.items():
            (conf / name).write_text(text)
        subprocess.run(
            [
                "chown",
                "-R",
                "_rspamd:_rspamd",
                str(self.dir / "run"),
                str(self.dir / "log"),
                str(self.db_dir),
            ],
            check=False,
        )

    def command(self) -> list[str]:
        return [
            self.program,
            "-f",
            "-u",
            "_rspamd",
            "-g",
            "_rspamd",
            "-c",
            "/etc/rspamd/rspamd.conf",
            f"--var=LOCAL_CONFDIR={self.dir / 'conf'}",
            f"--var=RUNDIR={self.dir / 'run'}",
            f"--var=LOGDIR={self.dir / 'log'}",
            f"--var=DBDIR={self.db_dir}",
        ]


class OpenDkim(_Harness):
    """OpenDKIM verifying (``Mode v``): it inserts ``Authentication-Results:``.

    Pitfalls (test-components.md §3): with ``Syslog no`` it logs nothing at all, and it
    is slow to exit on SIGTERM (``stop`` waits). Keys are looked up through the Debian
    build's libunbound, which ``ResolverConfiguration`` points at the test's own DNS
    server (``nameserver`` "127.0.0.1:PORT"), never at /etc/resolv.conf."""

    program = "/usr/sbin/opendkim"
    package = "opendkim"

    def __init__(self, nameserver: str, authserv_id: str = "mx.example.org") -> None:
        super().__init__()
        self.nameserver = nameserver
        self.authserv_id = authserv_id

    def prepare(self) -> None:
        host, _, port = self.nameserver.rpartition(":")
        (self.dir / "unbound.conf").write_text(
            "server:\n"
            "    do-not-query-localhost: no\n"
            '    module-config: "iterator"\n'
            "forward-zone:\n"
            '    name: "."\n'
            f"    forward-addr: {host}@{port}\n"
        )
        (self.dir / "opendkim.conf").write_text(
            "Syslog no\n"
            "Background no\n"
            "Mode v\n"
            f"Socket inet:{self.port}@127.0.0.1\n"
            f"PidFile {self.dir}/opendkim.pid\n"
            f"AuthservID {self.authserv_id}\n"
            f"ResolverConfiguration {self.dir}/unbound.conf\n"
            "AlwaysAddARHeader yes\n"
        )

    def command(self) -> list[str]:
        return [self.program, "-f", "-x", str(self.dir / "opendkim.conf")]


EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


class ClamavMilter(_Harness):
    """clamd with a signature database made here (no freshclam: there is no network),
    behind clamav-milter with ``OnInfected Reject``.

    The database is one body-pattern signature (``.ndb``: name, target 0 = any file,
    offset ``*``, hex) for a distinctive part of the EICAR test string, so it matches
    inside a mail part whatever surrounds it (an ``.hdb`` MD5 line matches only a part
    that is exactly the 68 bytes). clamd loads it in well under a second."""

    program = "/usr/sbin/clamav-milter"
    package = "clamav-milter"
    start_timeout = 60.0

    def __init__(self) -> None:
        if not Path("/usr/sbin/clamd").exists():
            raise MilterNotInstalled("clamd is missing: install the Debian package clamav-daemon")
        super().__init__()
        self.clamd: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        db = self.dir / "db"
        (self.dir / "tmp").mkdir()
        db.mkdir()
        pattern = EICAR[10:60].hex()
        (db / "postillon-test.ndb").write_text(f"Eicar-Test-Signature:0:*:{pattern}\n")
        self.socket = self.dir / "clamd.sock"
        (self.dir / "clamd.conf").write_text(
            "Foreground yes\n"
            f"DatabaseDirectory {db}\n"
            f"LocalSocket {self.socket}\n"
            f"PidFile {self.dir}/clamd.pid\n"
            f"TemporaryDirectory {self.dir}/tmp\n"
            f"LogFile {self.dir}/clamd.log\n"
            "User root\n"
        )
        (self.dir / "clamav-milter.conf").write_text(
            f"MilterSocket inet:{self.port}@127.0.0.1\n"
            f"ClamdSocket unix:{self.socket}\n"
            "Foreground yes\n"
            f"PidFile {self.dir}/milter.pid\n"
            f"LogFile {self.dir}/milter.log\n"
            "LogVerbose yes\n"
            "User root\n"
            "OnInfected Reject\n"
            "OnClean Accept\n"
            'RejectMsg "Virus found: %v"\n'
            "AddHeader Replace\n"
        )
        with open(self.dir / "clamd.out", "ab") as log:
            self.clamd = subprocess.Popen(
                ["/usr/sbin/clamd", "-c", str(self.dir / "clamd.conf")],
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_until(self._clamd_ready, self.start_timeout, "clamd answering PONG")

    def _clamd_ready(self) -> bool:
        import socket

        assert self.clamd is not None
        if self.clamd.poll() is not None:
            out = (self.dir / "clamd.out").read_text(errors="replace")
            raise RuntimeError(f"clamd exited with {self.clamd.returncode}:\n{out[-3000:]}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.socket))
                s.sendall(b"zPING\0")
                return s.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def command(self) -> list[str]:
        return [self.program, "-c", str(self.dir / "clamav-milter.conf")]

    def log(self) -> str:
        parts = []
        for name in ("output.log", "milter.log", "clamd.log"):
            try:
                parts.append((self.dir / name).read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(parts)

    def stop(self) -> None:
        if self.clamd is not None:
            pgid = self.clamd.pid
            stop_process(self.clamd, signal.SIGTERM, timeout=15)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.clamd = None
        super().stop()
