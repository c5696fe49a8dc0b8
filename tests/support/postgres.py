"""Run a real PostgreSQL server for tests: a private cluster in a temp dir, loopback only.

Design note
-----------
The shared queue of a postillon cluster lives in PostgreSQL (``queue/postgres_store.py``).
To test it against the real thing, :class:`PostgresServer` runs ``initdb`` into a fresh
temporary directory and starts ``postgres -D <dir>`` as a subprocess, listening on
``127.0.0.1:<free port>`` and on a unix socket in that directory. Nothing outside the
directory is written, and no systemd or Debian cluster tooling (``pg_ctlcluster``) is used.

* **Durability stays on**: ``fsync = on`` and ``synchronous_commit = on`` (the store's
  promise, "250 means durable", is what the tests check). Settings that do not touch
  durability are made cheap: ``wal_level = minimal`` (no replication), no autovacuum
  launcher delay games, small ``shared_buffers``, a generous ``max_connections`` for
  three postillon nodes plus the test's own connections.
* **Privileges**: PostgreSQL refuses to run as root. Run as root (as CI does), the
  cluster's files belong to the Debian ``postgres`` user (or ``postillon``) and every
  PostgreSQL program is started as that user (``subprocess``'s ``user=``). The temporary
  directory is made with :func:`tempfile.mkdtemp` (``/tmp`` is searchable by that user;
  pytest's ``/tmp/pytest-of-root`` is ``0700``). Authentication is ``trust`` for loopback
  and the socket: the cluster is private to the test run.
* ``stop()`` / ``start()`` restart the same cluster in place (the database-restart test);
  ``kill()`` sends SIGKILL to the postmaster (crash recovery runs at the next start).
* :meth:`create_database` gives each test its own database (``CREATE DATABASE`` copies
  ``template1`` in tens of milliseconds), so tests never see each other's rows.

Example::

    with PostgresServer() as pg:
        dsn = pg.create_database("queue_test")
        ...  # asyncpg.connect(dsn)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final

from support.ports import free_port, kill_group

__all__ = ["PostgresNotInstalled", "PostgresServer", "find_postgres_bin"]

SUPERUSER: Final = "postgres"  # the database role initdb creates
_RUN_AS_CANDIDATES: Final = ("postgres", "postillon")
_START_TIMEOUT: Final = 30.0

# Settings passed with -c: durability on, everything else cheap.
_SETTINGS: Final = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "max_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "listen_addresses": "127.0.0.1",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] ",
    "dynamic_shared_memory_type": "posix",
}


class PostgresNotInstalled(RuntimeError):
    pass


def find_postgres_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has ``postgres``."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not found:
        raise PostgresNotInstalled(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres): "
            "install the Debian package 'postgresql' (make system-deps)"
        )
    return Path(found[-1]).parent


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS_CANDIDATES:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresNotInstalled(
        "running as root, but neither a 'postgres' nor a 'postillon' user exists "
        "(PostgreSQL refuses to run as root): run scripts/ensure-user.sh postillon"
    )


class PostgresServer:
    """A private PostgreSQL cluster: ``start()``, ``dsn(db)``, ``stop()``, ``cleanup()``."""

    def __init__(self, port: int | None = None) -> None:
        self.bin = find_postgres_bin()
        self.user = _run_as()
        self.directory = Path(tempfile.mkdtemp(prefix="pg-"))
        self.data_dir = self.directory / "data"
        self.log_file = self.directory / "postgres.log"
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._initialized = False
        os.chmod(self.directory, 0o755)
        if self.user is not None:
            os.chown(self.directory, self.user.pw_uid, self.user.pw_gid)

    # -- lifecycle ----------------------------------------------------------
    def _popen_args(self) -> dict[str, object]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                # The catalog is rebuilt on every test run; only the queue's
                # own commits need to be durable, and those keep fsync = on.
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            cwd=self.directory,
            **self._popen_args(),  # type: ignore[call-overload]
        )
        self._initialized = True

    def start(self) -> PostgresServer:
        if self.process is not None and self.process.poll() is None:
            return self
        if not self._initialized:
            self._initdb()
        args = [str(self.bin / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        args += ["-c", f"unix_socket_directories={self.directory}"]
        for key, value in _SETTINGS.items():
            args += ["-c", f"{key}={value}"]
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                start_new_session=True,
                **self._popen_args(),  # type: ignore[call-overload]
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.log()}")
            result = subprocess.run(
                [
                    str(self.bin / "pg_isready"),
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    SUPERUSER,
                ],
                capture_output=True,
            )
            if result.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres did not become ready in {_START_TIMEOUT} s:\n{self.log()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the postmaster: ``fast`` (SIGINT: roll back, checkpoint) or ``immediate``."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash; recovery runs at the next start)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        kill_group(proc.pid)
        proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- databases ----------------------------------------------------------
    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with ``psql`` (synchronous, for fixtures); returns its output."""
        result = subprocess.run(
            [
                str(self.bin / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; return its DSN."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"unusable database name {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""
