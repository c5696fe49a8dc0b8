"""Run a real Dovecot LMTP server for tests: self-contained, loopback only, no systemd.

Design note
-----------
postillon hands local mail to an MDA over LMTP (DESIGN "local/"). To test that against the
real thing, :class:`DovecotLmtp` writes a complete Dovecot configuration into a fresh
temporary directory and runs ``dovecot -F -c <conf>`` (the master in the foreground) as a
subprocess in its own process group. Nothing outside that directory is written: base_dir
(sockets, pid file), state_dir, the log file, the passwd-file and every Maildir live inside
it, ``ssl = no``, ``protocols = lmtp``, and the only network listener is
``127.0.0.1:<free port>``. The same LMTP service also listens on a unix socket in the
directory. ``start()`` returns once the port and the socket accept and an LMTP session gets
its ``220`` greeting (the port alone accepts while the master is still forking its
children). Measured on the 2-core test machine: listening after about 11 ms
(``listen_seconds``), greeting after about 30 ms (``startup_seconds``; 60 ms at most).

Users come from a ``passwd-file`` userdb, so an address that is not listed is refused by
Dovecot at ``RCPT TO`` with ``550 5.1.1`` (a ``static`` userdb would accept anyone), and
tests can check per-recipient replies. Mail is stored as ``maildir:~/Maildir``, one home per
user under ``<dir>/mail/<domain>/<local part>``.

Privileges (the pitfalls this class deals with, found by running it):

* Dovecot refuses to deliver mail as uid 0. Run as root (as CI does), mail is owned by an
  unprivileged system user, ``nobody:nogroup`` by default, with ``first_valid_uid = 1``.
  Run as another user, the master runs unprivileged and mail belongs to that user.
* The ``auth`` process runs as the ``dovecot`` user and LMTP switches to the mail user, so
  the temporary directory is made ``0711`` (searchable, not listable) and the passwd-file
  ``0644``; its parent must be searchable too (``/tmp`` is; pytest's
  ``/tmp/pytest-of-root`` is ``0700``, which is why the directory is made with
  :func:`tempfile.mkdtemp` and not inside ``tmp_path``).
* A unix socket path is limited to 107 bytes, and Dovecot puts a dozen sockets in base_dir,
  so the directory must have a short path.
* The master resolves the machine's own name (``gethostbyname``: ``/etc/hosts``, then the
  resolver in ``/etc/resolv.conf``) each time it starts a process, unless
  ``DOVECOT_HOSTDOMAIN`` is in its environment; the ``hostname`` setting does not stop
  that, and the master drops variables not named in ``import_environment``. So the config
  sets ``import_environment = TZ DOVECOT_HOSTDOMAIN=<hostname>`` (and ``hostname``,
  ``postmaster_address``): Dovecot never asks the machine's resolver (checked with strace).

Stopping sends SIGTERM to the master (which stops its children: anvil, log, config, auth,
lmtp), then to any child still alive 50 ms later, while the master is there to reap it (PID 1
in a container may never reap orphans), and waits until the process group is empty; see
``_reap`` for why Dovecot alone would take 1 to 6 s. It takes about 0.1 s. The ``stats``
service is off (``stats_writer_socket_path =``). ``with DovecotLmtp(...)`` leaves nothing
running.

Python's ``smtplib.LMTP`` reads only one reply after DATA; LMTP sends one per accepted
recipient (RFC 2033 §4.2). Read the others with ``client.getreply()``, or use
:func:`lmtp_deliver`, which does that and collects every reply.

Example::

    with DovecotLmtp(["alice@example.org", "bob@example.org"]) as dovecot:
        with smtplib.LMTP(*dovecot.lmtp_address) as client:
            client.sendmail("sender@example.net", ["alice@example.org"],
                            b"Subject: x\\r\\n\\r\\nhi\\r\\n")
        assert b"hi" in dovecot.messages("alice@example.org")[0]
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from support.ports import free_port, group_members, kill_group, signal_each

DEBIAN_PACKAGES = ("dovecot-core", "dovecot-lmtpd")
MISSING_MESSAGE = (
    "Dovecot is not installed: install the Debian packages "
    + " ".join(DEBIAN_PACKAGES)
    + " (`make system-deps`, or `apt-get install "
    + " ".join(DEBIAN_PACKAGES)
    + "`)"
)
_DOVECOT_CANDIDATES = ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot")
_LMTP_CANDIDATES = (
    "/usr/lib/dovecot/lmtp",
    "/usr/libexec/dovecot/lmtp",
    "/usr/local/libexec/dovecot/lmtp",
)
_MAX_UNIX_PATH = 107  # sizeof(sun_path) - 1 on Linux


class DovecotNotInstalled(RuntimeError):
    """``dovecot`` or its LMTP service binary is missing (see :data:`MISSING_MESSAGE`)."""


class DovecotError(RuntimeError):
    """Dovecot could not be configured or started; the message carries its log."""


def find_dovecot() -> tuple[Path, Path]:
    """Return the paths of the ``dovecot`` master and the ``lmtp`` service binary."""
    master = shutil.which("dovecot") or next(
        (p for p in _DOVECOT_CANDIDATES if os.access(p, os.X_OK)), None
    )
    lmtp = next((p for p in _LMTP_CANDIDATES if os.access(p, os.X_OK)), None)
    if master is None or lmtp is None:
        raise DovecotNotInstalled(MISSING_MESSAGE)
    return Path(master), Path(lmtp)


def _split(user: str) -> tuple[str, str]:
    local, _, domain = user.rpartition("@")
    return (local, domain) if local else (user, "")


def _check_user(user: str) -> str:
    if not user or any(c in user for c in ":/\\\r\n\t ") or user.startswith("."):
        raise ValueError(f"unusable user name for a passwd-file: {user!r}")
    return user.lower()  # Dovecot's default auth_username_format is %Lu


@dataclass(frozen=True)
class LmtpResult:
    """Replies of one LMTP transaction made by :func:`lmtp_deliver`.

    ``rcpt`` maps every recipient to its ``RCPT TO`` reply; ``data`` maps every recipient
    that was accepted at RCPT to its own reply after the end of data (RFC 2033 §4.2).
    ``data`` is empty when no recipient was accepted (DATA is then not sent).
    """

    mail: tuple[int, bytes]
    rcpt: dict[str, tuple[int, bytes]]
    data: dict[str, tuple[int, bytes]]


def lmtp_deliver(
    client: smtplib.LMTP, sender: str, recipients: Sequence[str], message: bytes | str
) -> LmtpResult:
    """Run one LMTP transaction on a connected ``smtplib.LMTP`` (after LHLO) and collect
    every reply, including one reply per accepted recipient after DATA, which
    ``smtplib.LMTP.sendmail`` does not read."""
    if client.ehlo_resp is None and client.helo_resp is None:
        client.ehlo_or_helo_if_needed()
    mail = client.mail(sender)
    rcpt = {r: client.rcpt(r) for r in recipients}
    accepted = [r for r, (code, _) in rcpt.items() if 200 <= code < 300]
    data: dict[str, tuple[int, bytes]] = {}
    if accepted and 200 <= mail[0] < 300:
        first = client.data(message)  # raises SMTPDataError unless DATA got 354
        data[accepted[0]] = first
        for r in accepted[1:]:
            data[r] = client.getreply()
    else:
        client.rset()
    return LmtpResult(mail, rcpt, data)


class DovecotLmtp:
    """A private Dovecot LMTP server on 127.0.0.1 and a unix socket (see the module note).

    ``users`` are the mailbox addresses Dovecot knows (any other recipient gets
    ``550 5.1.1``). ``recipient_delimiter`` makes ``alice+tag@example.org`` reach
    ``alice@example.org`` (``None`` or ``""`` turns it off); with
    ``save_to_detail_mailbox`` such mail goes to the mailbox ``tag`` instead of INBOX.
    ``mail_user`` is the ``user:group`` that owns mail when running as root.
    ``parent`` is where the temporary directory is made (default: the system temp dir);
    ``keep`` leaves it on disk after stop, for debugging.
    """

    def __init__(
        self,
        users: Iterable[str] = ("alice@example.org", "bob@example.org"),
        *,
        recipient_delimiter: str | None = "+",
        save_to_detail_mailbox: bool = False,
        hostname: str = "lmtp.test",
        postmaster_address: str = "postmaster@lmtp.test",
        mail_user: str = "nobody:nogroup",
        parent: Path | str | None = None,
        keep: bool = False,
        start_timeout: float = 15.0,
        verbose: bool = False,
    ) -> None:
        self.users = [_check_user(u) for u in users]
        if len(set(self.users)) != len(self.users):
            raise ValueError("duplicate user")
        self.recipient_delimiter = recipient_delimiter or ""
        self.save_to_detail_mailbox = save_to_detail_mailbox
        self.hostname = hostname
        self.postmaster_address = postmaster_address
        self.mail_user = mail_user
        self.parent = Path(parent) if parent is not None else None
        self.keep = keep
        self.start_timeout = start_timeout
        self.verbose = verbose
        self.directory: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.listen_seconds: float | None = None
        """Seconds from spawning ``dovecot`` until the TCP port and the unix socket accept."""
        self.startup_seconds: float | None = None
        """Seconds from spawning ``dovecot`` until an LMTP session gets its 220 greeting."""
        self._final_log = ""

    # ----------------------------------------------------------------- paths and queries
    def _dir(self) -> Path:
        if self.directory is None:
            raise RuntimeError("DovecotLmtp is not started")
        return self.directory

    @property
    def config_path(self) -> Path:
        return self._dir() / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self._dir() / "dovecot.log"

    @property
    def base_dir(self) -> Path:
        return self._dir() / "run"

    @property
    def unix_socket(self) -> Path:
        """The LMTP unix socket (``smtplib.LMTP(str(path))`` connects to it)."""
        return self.base_dir / "lmtp"

    @property
    def lmtp_address(self) -> tuple[str, int]:
        """``("127.0.0.1", port)`` of the LMTP TCP listener."""
        if self.port is None:
            raise RuntimeError("DovecotLmtp is not started")
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def processes(self) -> list[int]:
        """Live (non-zombie) processes of this Dovecot: the master and its children."""
        if self.proc is None:
            return []
        return sorted(p for p, state in group_members(self.proc.pid).items() if state != "Z")

    def home(self, user: str) -> Path:
        local, domain = _split(_check_user(user))
        mail = self._dir() / "mail"
        return mail / domain / local if domain else mail / local

    def maildir(self, user: str, mailbox: str | None = None) -> Path:
        """The Maildir of ``user`` (INBOX), or of a mailbox in it (Maildir++ ``.name``)."""
        root = self.home(user) / "Maildir"
        return root / ("." + mailbox.replace("/", ".")) if mailbox else root

    def message_paths(self, user: str, mailbox: str | None = None) -> list[Path]:
        """The message files in ``new/`` and ``cur/``, oldest first (by file name)."""
        root = self.maildir(user, mailbox)
        paths = [
            p
            for sub in ("new", "cur")
            if (root / sub).is_dir()
            for p in (root / sub).iterdir()
            if p.is_file()
        ]
        return sorted(paths, key=lambda p: p.name)

    def messages(self, user: str, mailbox: str | None = None) -> list[bytes]:
        """Contents of every message in ``new/`` and ``cur/``, oldest first."""
        return [p.read_bytes() for p in self.message_paths(user, mailbox)]

    def log(self) -> str:
        """Everything Dovecot logged so far (one file: info, warnings, errors)."""
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return self._final_log

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it contains ``text`` (or as it is after ``timeout``).

        Dovecot writes its log through a separate log process, so a line about
        a delivery can land a moment after the LMTP reply the client saw."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return log

    def _stderr(self) -> str:
        try:
            return (self._dir() / "stderr.log").read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""

    # ----------------------------------------------------------------- configuration
    def _mail_ids(self) -> tuple[int, int, str]:
        """uid and gid owning mail, and the user name Dovecot's own processes run as."""
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            return os.geteuid(), os.getegid(), me.pw_name
        user, _, group = self.mail_user.partition(":")
        try:
            entry = pwd.getpwnam(user)
            gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
        except KeyError as exc:
            raise DovecotError(f"mail user {self.mail_user!r} does not exist") from exc
        if entry.pw_uid == 0:
            raise DovecotError("Dovecot does not deliver mail as root; choose another mail_user")
        return entry.pw_uid, gid, ""

    def _config(self, run_as: str) -> str:
        d = self._dir()
        lines = [
            "# Written by tests/support/dovecot.py; self-contained, loopback only.",
            f"base_dir = {self.base_dir}",
            f"state_dir = {d / 'state'}",
            f"instance_name = postillon-test-{d.name}",
            f"log_path = {self.log_path}",
            f"info_log_path = {self.log_path}",
            f"debug_log_path = {self.log_path}",
            "protocols = lmtp",
            "listen = 127.0.0.1",
            "ssl = no",
            f"hostname = {self.hostname}",
            # The master cleans its environment, then resolves its own name for the
            # processes it starts unless DOVECOT_HOSTDOMAIN is set (see the module note).
            f"import_environment = TZ DOVECOT_HOSTDOMAIN={self.hostname}",
            "mail_location = maildir:~/Maildir",
            "first_valid_uid = 1",
            "first_valid_gid = 1",
            f"recipient_delimiter = {self.recipient_delimiter}",
            "shutdown_clients = yes",
            # No stats: a process forked during shutdown otherwise waits 5 s for the
            # stats-writer handshake after the stats process has gone.
            "stats_writer_socket_path =",
        ]
        if self.verbose:
            lines += ["mail_debug = yes", "auth_debug = yes", "auth_verbose = yes"]
        if run_as:  # not root: every Dovecot process runs as the current user and group
            group = grp.getgrgid(os.getegid()).gr_name
            lines += [
                f"default_internal_user = {run_as}",
                f"default_login_user = {run_as}",
                f"default_internal_group = {group}",
                "service anvil {\n  chroot =\n}",
                "service auth-worker {\n  user = \n}",
            ]
        users = d / "users"
        lines += [
            "passdb {",
            "  driver = passwd-file",
            f"  args = {users}",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = {users}",
            "}",
            "service lmtp {",
            "  inet_listener lmtp {",
            "    address = 127.0.0.1",
            f"    port = {self.port}",
            "  }",
            "  unix_listener lmtp {",
            "    mode = 0666",
            "  }",
            "}",
            "protocol lmtp {",
            f"  postmaster_address = {self.postmaster_address}",
            f"  lmtp_save_to_detail_mailbox = {'yes' if self.save_to_detail_mailbox else 'no'}",
            "  lda_mailbox_autocreate = yes",  # else a detail mailbox must exist beforehand
            "}",
        ]
        return "\n".join(lines) + "\n"

    def _write_files(self) -> None:
        d = self._dir()
        uid, gid, run_as = self._mail_ids()
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir()
        # auth runs as the `dovecot` user and LMTP as the mail user: both must pass through.
        d.chmod(0o711)
        entries = []
        for user in self.users:
            home = self.home(user)
            home.mkdir(parents=True, exist_ok=True)
            # passwd-file: user:password:uid:gid:gecos:home:shell:extra
            entries.append(f"{user}:{{PLAIN}}{secrets.token_hex(8)}:{uid}:{gid}::{home}::\n")
        users = d / "users"
        users.write_text("".join(entries))
        users.chmod(0o644)
        if os.geteuid() == 0:
            for path in [d / "mail", *(p for p in (d / "mail").rglob("*"))]:
                os.chown(path, uid, gid)
        self.config_path.write_text(self._config(run_as))

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> DovecotLmtp:
        if self.proc is not None:
            raise RuntimeError("DovecotLmtp already started")
        master, _ = find_dovecot()
        self.directory = Path(tempfile.mkdtemp(prefix="pdove-", dir=self.parent))
        try:
            if len(str(self.unix_socket)) + 24 > _MAX_UNIX_PATH:  # + room for auth-userdb etc.
                raise DovecotError(
                    f"temporary directory path too long for unix sockets: "
                    f"{self.directory} (use a shorter parent)"
                )
            self.port = free_port()
            self._write_files()
            for _attempt in range(5):
                try:
                    self._spawn(master)
                    break
                except _PortTaken:
                    self.port = free_port()
                    self.config_path.write_text(self._config(self._mail_ids()[2]))
            else:
                raise DovecotError("could not find a free port for Dovecot\n" + self.log())
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, master: Path) -> None:
        stderr = open(self._dir() / "stderr.log", "ab")  # noqa: SIM115 (owned by the child)
        began = time.monotonic()
        self.listen_seconds = None
        try:
            self.proc = subprocess.Popen(
                [str(master), "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
                cwd=self._dir(),
            )
        finally:
            stderr.close()
        deadline = began + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                text = self._stderr() + self.log()
                self._reap()
                if "Address already in use" in text:
                    raise _PortTaken
                raise DovecotError(
                    f"dovecot exited with {self.proc.returncode} at start:\n" + text[-5000:]
                )
            if self.listen_seconds is None and self.unix_socket.exists() and self._accepts():
                self.listen_seconds = time.monotonic() - began
            if self.listen_seconds is not None and self._greets(deadline):
                break
            if time.monotonic() > deadline:
                text = (self._stderr() + self.log())[-5000:]
                raise DovecotError(
                    f"dovecot did not greet on 127.0.0.1:{self.port} within "
                    f"{self.start_timeout}s:\n{text}"
                )
            time.sleep(0.002)
        self.startup_seconds = time.monotonic() - began

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(self.lmtp_address, timeout=1):
                return True
        except OSError:
            return False

    def _greets(self, deadline: float) -> bool:
        """Whether an LMTP session gets the ``220`` greeting (an lmtp process is serving)."""
        try:
            with socket.create_connection(self.lmtp_address, timeout=1) as conn:
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                greeting = b""
                while not greeting.endswith(b"\n"):
                    chunk = conn.recv(512)
                    if not chunk:
                        return False
                    greeting += chunk
                if not greeting.startswith(b"220 "):
                    return False
                conn.sendall(b"QUIT\r\n")
                conn.recv(512)
                return True
        except OSError:
            return False

    def _reap(self) -> None:
        """Stop the whole process group and wait until it is empty.

        The master must reap its own children: orphans are re-parented to PID 1, which in a
        container may never reap them. So SIGTERM goes to the master first, which stops its
        children. Left alone it then takes 1 to 6 s: it keeps its ``log`` child to the end
        and waits for it, and a child forked just before shutdown sits 5 s in a handshake
        with the already stopped ``config`` (or ``stats``) process. So after a 50 ms grace
        every child still alive gets SIGTERM directly (SIGKILL 0.5 s later), while the
        master is still there to reap them; and a master with no live child left gets
        SIGKILL after 0.15 s (it sometimes lingers a second more). Stopping takes about
        0.1 s. SIGKILL to the whole group is the fallback after 10 s.
        """
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the master leads its own group
        began = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        children_termed: float | None = None
        childless_since: float | None = None
        while True:
            members = group_members(pgid)
            master_alive = proc.poll() is None
            if not master_alive and all(state == "Z" for state in members.values()):
                return
            now = time.monotonic()
            live = [p for p, state in members.items() if p != pgid and state != "Z"]
            if master_alive and live:
                childless_since = None
                if children_termed is None and now - began > 0.05:
                    children_termed = now
                    signal_each(live, signal.SIGTERM)
                elif children_termed is not None and now - children_termed > 0.5:
                    signal_each(live, signal.SIGKILL)
            elif master_alive:
                childless_since = childless_since or now
                if now - childless_since > 0.15:
                    proc.kill()
                    proc.wait()
            if now - began > 10:
                kill_group(pgid)
                if now - began > 20:
                    raise DovecotError(f"dovecot processes left running: {sorted(members)}")
            time.sleep(0.002)

    def stop(self) -> None:
        """Stop Dovecot (nothing stays running) and remove the directory unless ``keep``."""
        try:
            self._reap()
        finally:
            self.proc = None
            if self.directory is not None and not self.keep:
                self._final_log = self.log()
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DovecotLmtp:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<DovecotLmtp {self.directory} port={self.port} pid={self.pid} users={self.users}>"


class _PortTaken(Exception):
    """The port picked for the listener was taken before Dovecot bound it."""
