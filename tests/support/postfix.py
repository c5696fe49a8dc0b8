"""Run a private, real Postfix MTA for tests: loopback only, no syslog, no system instance.

Design note
-----------
postillon must interoperate with the MTAs it meets on the Internet, and Postfix is the most
common one. :class:`PostfixInstance` writes a complete Postfix configuration (``main.cf``,
``master.cf``, a few ``texthash:`` tables, a self-signed certificate) into a fresh temporary
directory and runs it with ``postfix -c <dir>/etc start``. Everything it writes stays in that
directory: the queue (``queue_directory``), ``data_directory``, the mail log
(``maillog_file``, written by ``postlogd``: no syslog needed) and the delivered mail.

What the instance does:

* **Listens** only on ``address:port`` (default ``127.0.0.4:25``, named on the ``smtpd``
  line of ``master.cf``), ``inet_protocols = ipv4``. ``inet_interfaces = 127.0.0.1`` and
  ``proxy_interfaces = <address>`` (see the pitfalls); ``mynetworks = 127.0.0.0/8``, so
  loopback clients may relay.
* **Delivers** mail for ``domain`` (default ``pf.test``) to Maildirs with the ``virtual(8)``
  agent: ``virtual_mailbox_domains``/``_maps``/``_base`` and a static uid/gid (``nobody``);
  ``<dir>/mail/<domain>/<mailbox>/{new,cur,tmp}``. An address that is not one of
  ``mailboxes`` is refused at ``RCPT`` with ``550 5.1.1`` (``smtpd_reject_unlisted_recipient``).
  There is no ``local(8)`` delivery (``mydestination`` is empty).
* **Relays** per domain through ``transport_maps``: ``transports={"example.org":
  "smtp:[127.0.0.1]:2525"}`` (see :func:`smtp_route`). Every other domain ends at a ``*``
  entry ``error:5.4.4 ...`` and bounces at once, and ``smtp_dns_support_level = disabled``:
  Postfix never resolves a name, so nothing it does leaves loopback.
* **TLS** both ways: ``smtpd_tls_security_level = may`` with a self-signed certificate (so a
  client's opportunistic STARTTLS is exercised), ``smtp_tls_security_level = may`` for
  relaying, both with ``tls_loglevel = 1`` (``... TLS connection established ...`` in the
  log) and ``smtpd_tls_received_header = yes`` (the TLS version in ``Received:``).
* **Refuses on purpose**: ``recipient_access={"defer@pf.test": "450 4.2.0 Try later"}``
  becomes ``check_recipient_access`` at ``RCPT`` (any Postfix access action works);
  :meth:`PostfixInstance.set_recipient_access` changes it on the fly (``postfix reload``).
* Retries quickly (``minimal_backoff_time = 1s``), never looks up a client's name
  (``smtpd_peername_lookup = no``) and, with ``debug_smtp_client=True`` (default), its SMTP
  client logs the dialogue with loopback servers (``debug_peer_list``) so tests can see the
  commands and ``Using ESMTP PIPELINING``.

``start()`` refuses an ``address:port`` where something already answers, runs ``postfix
check`` (which also makes the queue directories) and fails on any warning (``check_output``
keeps what it printed), then ``postfix start``, and returns when ``smtpd`` answers ``220``
with this instance's token in its banner (``smtpd_banner``), so a test never talks to some
other server by mistake. ``stop()`` runs ``postfix stop`` (about 30 ms; now and then 1 s,
when its own once-a-second poll of ``master -t`` comes too early) and waits until no process
of the instance's process group is left (``SIGKILL`` after 10 s), so ``with
PostfixInstance(...)`` leaves nothing running; the directory is then removed unless
``keep``.

Privileges: Postfix runs only as root (``postfix`` is "reserved for the superuser"), and
``virtual(8)`` writes mail as ``nobody:nogroup`` (it refuses uids below
``virtual_minimum_uid``). Run as another user, :meth:`PostfixInstance.start` raises
:class:`PostfixNeedsRoot` saying so. A missing Postfix raises :class:`PostfixNotInstalled` with
:data:`MISSING_MESSAGE` (``make system-deps``).

Pitfalls met while writing this (each handled here):

* ``postfix`` commands print errors only when stderr is a terminal, otherwise only to
  syslog (absent here, and ``maillog_file`` is not used before the config is read): a bad
  ``main.cf`` made ``postfix check`` exit 1 in silence. Commands therefore run on a
  pseudo-terminal and :class:`PostfixError` carries what they printed.
* ``inet_interfaces = 127.0.0.4`` is fatal ("no local interface found for 127.0.0.4"): it
  must name an address configured on an interface, and ``lo`` has only ``127.0.0.1`` (any
  ``127/8`` address can still be bound). So the listener's address is on its
  ``master.cf`` line and in ``proxy_interfaces`` (Postfix counts it as its own).
* ``maillog_file`` must start with one of ``maillog_file_prefixes`` (default ``/var,
  /dev/stdout``): a log in ``/tmp`` is fatal unless the prefix list names the directory.
* Postfix rereads a configuration file that changed in the last second or so, pausing
  300 ms between tries, until it is two seconds old (``load_file``): with a fresh ``main.cf``
  every ``postfix`` and ``postconf`` command took 2 s, and ``postfix check`` (which runs
  ``postconf`` twenty times) 2.5 s. The files are dated back a minute after writing, and
  ``postfix start`` is told (``<queue>/quick-start``) that ``postfix check`` just ran; a start
  then takes about 0.25 s in all.
* The Postfix master daemonizes into its own session, so its pid (``pid/master.pid``) is
  also the process group of every Postfix process, which :meth:`stop` watches until empty.
  Zombies (the master's children outlive it for a moment and are then reaped by PID 1)
  count as gone.
* An instance left running (an interrupted run; once, during development, for a reason
  never pinned down) keeps ``127.0.0.4:25``: the next instance's master cannot bind it,
  and a readiness check that only waits for a ``220`` is answered by the old one, so every
  test then talks to the wrong Postfix. Hence the busy-port check and the banner token.
  ``stop()`` runs ``postfix stop`` even when no process of the instance is seen.
* Postfix's ``sendmail``/``postdrop``/``postqueue`` accept a non-default configuration
  directory only from root (or when the default ``main.cf`` lists it in
  ``alternate_config_directories``; the Debian package installs no ``main.cf`` at all).
  :meth:`sendmail` therefore needs root; :meth:`send` uses SMTP.
* The temporary directory must be searchable by ``postfix`` and ``nobody`` (``0755``), and
  ``virtual_mailbox_base`` writable by ``nobody``: ``virtual(8)`` makes the Maildirs as the
  mail user. ``mkdtemp`` makes ``0700``, and pytest's ``tmp_path`` lives under a ``0700``
  directory, hence :func:`tempfile.mkdtemp` in the system temp directory.
* Postfix's SMTP client (3.7) never sends ``BDAT``, even to a server offering ``CHUNKING``;
  only its ``smtpd`` accepts it.

Example::

    with PostfixInstance(transports={"example.org": smtp_route("127.0.0.1", 2525)}) as pf:
        pf.send("sender@pf.test", ["alice@example.org"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
        pf.wait_log("status=sent")
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import select
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from postillon.inbound.tls import ensure_self_signed
from support.ports import group_members, kill_group

DEBIAN_PACKAGES = ("postfix",)
MISSING_MESSAGE = (
    "Postfix is not installed: install the Debian package postfix "
    "(`make system-deps`, or `apt-get install postfix` with debconf "
    "postfix/main_mailer_type = 'No configuration')"
)
POSTFIX = "/usr/sbin/postfix"
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"
_QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold")
_QUEUED_AS = re.compile(rb"queued as ([0-9A-Za-z]+)")


class PostfixNotInstalled(RuntimeError):
    """The ``postfix`` command or its daemons are missing (see :data:`MISSING_MESSAGE`)."""


class PostfixError(RuntimeError):
    """Postfix could not be configured, started or stopped; the message carries its log."""


class PostfixNeedsRoot(PostfixError):
    """Postfix runs only as root (``postfix start`` is reserved for the superuser)."""


def find_postfix() -> Path:
    """The ``postfix`` command, after checking that the daemons it starts are there."""
    command = shutil.which("postfix", path="/usr/sbin:/usr/local/sbin:/sbin") or POSTFIX
    daemons = Path(DAEMON_DIRECTORY)
    if not os.access(command, os.X_OK) or not all(
        os.access(daemons / name, os.X_OK) for name in ("master", "smtpd", "smtp", "virtual")
    ):
        raise PostfixNotInstalled(MISSING_MESSAGE)
    return Path(command)


def smtp_route(host: str, port: int) -> str:
    """A ``transport_maps`` value: SMTP to ``host:port`` with no MX lookup (``[host]``)."""
    return f"smtp:[{host}]:{port}"


def _cool_down(directory: Path) -> None:
    """Date the files in ``directory`` back a minute. Postfix rereads a configuration
    file that changed within the last second or so, pausing 300 ms between tries (its
    ``load_file``), until it is two seconds old: a fresh ``main.cf`` made every Postfix
    command take about two seconds."""
    past = time.time() - 60
    for path in directory.iterdir():
        os.utime(path, (past, past))


def _check_key(value: str, what: str) -> str:
    if not value or any(c.isspace() for c in value) or "#" in value:
        raise ValueError(f"unusable {what} for a Postfix table: {value!r}")
    return value


def _check_value(value: str, what: str) -> str:
    if not value.strip() or "\n" in value or "\r" in value:
        raise ValueError(f"unusable {what} for a Postfix table: {value!r}")
    return value


def _table(entries: Mapping[str, str], what: str) -> dict[str, str]:
    return {_check_key(k, what): _check_value(v, what) for k, v in entries.items()}


class PostfixInstance:
    """A private Postfix on ``address:port`` (see the module note).

    ``domain`` and ``mailboxes`` (local parts) are what it delivers to Maildir;
    ``transports`` maps other domains to ``transport_maps`` routes (``smtp_route()``);
    ``recipient_access`` maps addresses (or domains) to access actions checked at ``RCPT``;
    ``main_cf`` adds or overrides ``main.cf`` parameters. ``port`` defaults to 25.
    ``debug_smtp_client`` logs the SMTP client's dialogue with loopback servers.
    ``mail_user`` is the ``user:group`` that owns delivered mail. ``parent`` is where the
    temporary directory is made; ``keep`` leaves it on disk after stop.
    """

    def __init__(
        self,
        *,
        domain: str = "pf.test",
        mailboxes: Iterable[str] = ("user", "sender", "postmaster"),
        address: str = "127.0.0.4",
        port: int | None = None,
        hostname: str = "postfix.pf.test",
        transports: Mapping[str, str] | None = None,
        recipient_access: Mapping[str, str] | None = None,
        main_cf: Mapping[str, str] | None = None,
        debug_smtp_client: bool = True,
        mail_user: str = "nobody:nogroup",
        parent: Path | str | None = None,
        keep: bool = False,
        start_timeout: float = 20.0,
    ) -> None:
        self.domain = _check_key(domain.lower(), "domain")
        self.mailboxes = [_check_key(m.lower(), "mailbox") for m in mailboxes]
        self.address = address
        self.port = 25 if port is None else port
        self.hostname = hostname
        self.transports = _table(transports or {}, "transport_maps entry")
        self.recipient_access = _table(recipient_access or {}, "access table entry")
        self.main_cf = dict(main_cf or {})
        self.debug_smtp_client = debug_smtp_client
        self.mail_user = mail_user
        self.parent = Path(parent) if parent is not None else None
        self.keep = keep
        self.start_timeout = start_timeout
        self.directory: Path | None = None
        self.master_pid: int | None = None
        self.startup_seconds: float | None = None
        """Seconds from ``postfix start`` until ``smtpd`` greets on the port."""
        self.check_output = ""
        """What ``postfix check`` printed (empty when all is well)."""
        self._final_log = ""
        self._start_attempted = False

    # ----------------------------------------------------------------- paths and queries
    def _dir(self) -> Path:
        if self.directory is None:
            raise RuntimeError("PostfixInstance is not started")
        return self.directory

    @property
    def config_directory(self) -> Path:
        return self._dir() / "etc"

    @property
    def queue_directory(self) -> Path:
        return self._dir() / "spool"

    @property
    def data_directory(self) -> Path:
        return self._dir() / "data"

    @property
    def log_path(self) -> Path:
        return self._dir() / "maillog"

    @property
    def mail_base(self) -> Path:
        """``virtual_mailbox_base``: Maildirs are ``<mail_base>/<domain>/<mailbox>/``."""
        return self._dir() / "mail"

    @property
    def smtp_address(self) -> tuple[str, int]:
        """``(address, port)`` of Postfix's SMTP server."""
        return (self.address, self.port)

    def mailbox_address(self, mailbox: str) -> str:
        return f"{mailbox}@{self.domain}"

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user`` (``"user"`` or ``"user@<domain>"``)."""
        local, _, domain = user.lower().rpartition("@")
        if not local:
            local, domain = domain, self.domain
        if domain != self.domain or local not in self.mailboxes:
            raise ValueError(f"{user!r} is not a mailbox of this Postfix")
        return self.mail_base / domain / local

    def message_paths(self, user: str) -> list[Path]:
        """Message files in ``new/`` and ``cur/``, oldest first (Maildir names start with
        the delivery time)."""
        root = self.maildir(user)
        found = [
            p
            for sub in ("new", "cur")
            if (root / sub).is_dir()
            for p in (root / sub).iterdir()
            if p.is_file()
        ]
        return sorted(found, key=lambda p: p.name)

    def messages(self, user: str) -> list[bytes]:
        """Contents of every message delivered to ``user``, oldest first."""
        return [p.read_bytes() for p in self.message_paths(user)]

    def wait_for_messages(self, user: str, count: int = 1, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(user)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Postfix mailbox {user}: {len(found)} of {count} message(s) after "
                    f"{timeout}s\nPostfix log:\n{self.log()[-4000:]}"
                )
            time.sleep(0.05)

    def log(self) -> str:
        """Everything Postfix logged so far (``maillog_file``)."""
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return self._final_log

    def wait_log(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> str:
        """Wait until the log contains ``pattern`` (a substring, or a compiled regex); return
        the whole log. ``postlogd`` writes asynchronously, so lines appear a little late."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if pattern.search(text) if isinstance(pattern, re.Pattern) else pattern in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not in the Postfix log after {timeout}s:\n{text[-4000:]}"
                )
            time.sleep(0.05)

    def queued(self) -> list[str]:
        """Queue ids of messages still in Postfix's queue (any queue but ``corrupt``)."""
        ids = [
            p.name
            for sub in _QUEUE_SUBDIRS
            if (self.queue_directory / sub).is_dir()
            for p in (self.queue_directory / sub).rglob("*")
            if p.is_file()
        ]
        return sorted(ids)

    @property
    def pid(self) -> int | None:
        return self.master_pid

    def processes(self) -> list[int]:
        """Live (non-zombie) processes of this instance: the master and its children."""
        if self.master_pid is None:
            return []
        members = group_members(self.master_pid)
        return sorted(p for p, state in members.items() if state != "Z")

    # ----------------------------------------------------------------- injecting mail
    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes | str,
        *,
        starttls: bool = False,
        helo: str = "client.test",
        timeout: float = 10.0,
    ) -> str:
        """Submit a message over SMTP; return Postfix's queue id. Every recipient must be
        accepted (``smtplib.SMTPRecipientsRefused`` otherwise)."""
        with smtplib.SMTP(self.address, self.port, local_hostname=helo, timeout=timeout) as c:
            c.ehlo()
            if starttls:
                c.starttls()
                c.ehlo()
            c.mail(sender)
            for rcpt in recipients:
                code, reply = c.rcpt(rcpt)
                if code != 250:
                    raise smtplib.SMTPRecipientsRefused({rcpt: (code, reply)})
            code, reply = c.data(message)
        if code != 250:
            raise smtplib.SMTPDataError(code, reply)
        match = _QUEUED_AS.search(reply)
        return match.group(1).decode() if match else ""

    def sendmail(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """Submit through Postfix's own ``sendmail`` command (postdrop → maildrop →
        pickup). Needs root: Postfix accepts a non-default ``-C`` directory only from root."""
        subprocess.run(
            [
                "/usr/sbin/sendmail",
                "-C",
                str(self.config_directory),
                "-f",
                sender,
                "--",
                *recipients,
            ],
            input=message,
            check=True,
            capture_output=True,
            timeout=30,
        )

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c <etc> ARGS`` (``"flush"``, ``"reload"``, ...); its output
        (stdout and stderr) is in ``.stdout``. ``check`` raises :class:`PostfixError` on a
        non-zero exit."""
        result = self._run(find_postfix(), *args)
        if check and result.returncode != 0:
            raise PostfixError(
                f"postfix {' '.join(args)} failed ({result.returncode}):\n{result.stdout}"
            )
        return result

    # ----------------------------------------------------------------- configuration
    @property
    def _token(self) -> str:
        """Names this instance in its SMTP banner (``_wait_greeting`` looks for it)."""
        return f"Postfix-test-{self._dir().name}"

    def _mail_ids(self) -> tuple[int, int]:
        user, _, group = self.mail_user.partition(":")
        try:
            entry = pwd.getpwnam(user)
            gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
        except KeyError as exc:
            raise PostfixError(f"mail user {self.mail_user!r} does not exist") from exc
        return entry.pw_uid, gid

    def _main_cf(self, uid: int, gid: int) -> dict[str, str]:
        d = self._dir()
        etc = self.config_directory
        tls = d / "tls"
        recipient_restrictions = [
            f"check_recipient_access texthash:{etc / 'recipient_access'}",
            "permit_mynetworks",
            "reject_unauth_destination",
        ]
        params = {
            "compatibility_level": "3.6",
            # Where things are: all of the instance's state inside the temporary directory.
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "command_directory": "/usr/sbin",
            "daemon_directory": DAEMON_DIRECTORY,
            "shlib_directory": "/usr/lib/postfix",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(d),
            # Who we are; set explicitly so Postfix never asks the system for its name.
            "myhostname": self.hostname,
            "smtpd_banner": f"$myhostname ESMTP {self._token}",
            "mydomain": self.domain,
            "myorigin": "$myhostname",
            # inet_interfaces must be an address configured on an interface ("no local
            # interface found for 127.0.0.4"): lo has only 127.0.0.1. The listener's own
            # address is in master.cf, and proxy_interfaces makes Postfix count it as its own.
            "inet_interfaces": "127.0.0.1",
            "proxy_interfaces": self.address,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # No local(8) delivery, no aliases: only virtual Maildirs and relaying.
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.mail_base),
            "virtual_mailbox_maps": f"texthash:{etc / 'virtual_mailboxes'}",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            # Routing: listed domains go where the test says, everything else bounces.
            # No DNS at all, and no host name that would need a lookup.
            "transport_maps": f"texthash:{etc / 'transport'}",
            "relayhost": "",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": ", ".join(recipient_restrictions),
            # TLS: offered by smtpd, used opportunistically by smtp.
            "smtpd_tls_cert_file": str(tls / "selfsigned-cert.pem"),
            "smtpd_tls_key_file": str(tls / "selfsigned-key.pem"),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtp_tls_security_level": "may",
            "smtp_tls_loglevel": "1",
            # Tests should not wait minutes for a retry.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
        }
        params.update(self.main_cf)
        return params

    def _master_cf(self) -> str:
        smtp_options = ""
        if self.debug_smtp_client:
            # The SMTP client logs its dialogue with loopback servers (commands, replies,
            # "Using ESMTP PIPELINING"); smtpd stays quiet.
            smtp_options = "\n  -o debug_peer_list=127.0.0.0/8 -o debug_peer_level=1"
        services = [
            f"{self.address}:{self.port} inet n - n - - smtpd",
            "pickup     unix  n - n 60 1 pickup",
            "cleanup    unix  n - n - 0 cleanup",
            "qmgr       unix  n - n 300 1 qmgr",
            "tlsmgr     unix  - - n 1000? 1 tlsmgr",
            "rewrite    unix  - - n - - trivial-rewrite",
            "bounce     unix  - - n - 0 bounce",
            "defer      unix  - - n - 0 bounce",
            "trace      unix  - - n - 0 bounce",
            "verify     unix  - - n - 1 verify",
            "flush      unix  n - n 1000? 0 flush",
            "proxymap   unix  - - n - - proxymap",
            "proxywrite unix  - - n - 1 proxymap",
            "smtp       unix  - - n - - smtp" + smtp_options,
            "relay      unix  - - n - - smtp" + smtp_options,
            "showq      unix  n - n - - showq",
            "error      unix  - - n - - error",
            "retry      unix  - - n - - error",
            "discard    unix  - - n - - discard",
            "virtual    unix  - n n - - virtual",
            "anvil      unix  - - n - 1 anvil",
            "scache     unix  - - n - 1 scache",
            "postlog    unix-dgram n - n - 1 postlogd",
        ]
        header = "# Written by tests/support/postfix.py: no chroot, one loopback listener.\n"
        return header + "\n".join(services) + "\n"

    def _write_files(self) -> None:
        d = self._dir()
        uid, gid = self._mail_ids()
        etc = self.config_directory
        for sub in (etc, self.queue_directory, self.data_directory, self.mail_base):
            sub.mkdir()
        # postfix (queue, data) and the mail user (Maildirs) must pass through.
        d.chmod(0o755)
        os.chown(self.data_directory, pwd.getpwnam("postfix").pw_uid, -1)
        os.chown(self.mail_base, uid, gid)
        ensure_self_signed(d / "tls", self.hostname)
        mailboxes = "".join(
            f"{m}@{self.domain}\t{self.domain}/{m}/\n" for m in self.mailboxes
        )  # a trailing slash means Maildir
        (etc / "virtual_mailboxes").write_text(mailboxes)
        routes = {self.domain: "virtual:", **self.transports}
        routes.setdefault("*", "error:5.4.4 no route off loopback in this test instance")
        (etc / "transport").write_text("".join(f"{k}\t{v}\n" for k, v in routes.items()))
        self._write_recipient_access()
        params = self._main_cf(uid, gid)
        (etc / "main.cf").write_text(
            "# Written by tests/support/postfix.py; self-contained, loopback only.\n"
            + "".join(f"{k} = {v}\n" for k, v in params.items())
        )
        (etc / "master.cf").write_text(self._master_cf())
        _cool_down(etc)

    def _write_recipient_access(self) -> None:
        access = "".join(f"{k}\t{v}\n" for k, v in self.recipient_access.items())
        (self.config_directory / "recipient_access").write_text(access)

    def set_recipient_access(self, recipient_access: Mapping[str, str]) -> None:
        """Replace the ``RCPT`` access table and ``postfix reload`` (a ``texthash:`` table is
        read when a process starts; reload replaces the running smtpd processes)."""
        self.recipient_access = _table(recipient_access, "access table entry")
        self._write_recipient_access()
        _cool_down(self.config_directory)
        self.postfix("reload")

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> PostfixInstance:
        if self.directory is not None:
            raise RuntimeError("PostfixInstance already started")
        command = find_postfix()
        if os.geteuid() != 0:
            raise PostfixNeedsRoot(
                "Postfix runs only as root (`postfix start` is reserved for the superuser); "
                "run the Postfix tests as root, as CI does"
            )
        self._refuse_busy_port()
        self.directory = Path(tempfile.mkdtemp(prefix="postfix-", dir=self.parent))
        try:
            self._write_files()
            # `postfix check` also makes the queue's subdirectories (post-install
            # create-missing) and fails on what `postfix start` would only log.
            self._run_checked(command, "check")
            # `postfix start` would run the same checks again; this file, which it
            # removes, tells it not to.
            (self.queue_directory / "quick-start").touch()
            began = time.monotonic()
            self._start_attempted = True
            result = self._run(command, "start")
            if result.returncode != 0:
                raise PostfixError(
                    f"postfix start failed ({result.returncode}):\n{result.stdout}"
                    f"{result.stderr}\n{self.log()[-4000:]}"
                )
            self.master_pid = self._wait_master_pid()
            self._wait_greeting(began + self.start_timeout)
            self.startup_seconds = time.monotonic() - began
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, command: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c <etc> ARGS``; stdout and stderr together in ``.stdout``.

        Postfix commands print their errors only when stderr is a terminal (otherwise only
        to syslog, which is absent here: ``postfix check`` just exits 1), so the command
        gets a pseudo-terminal and whatever it printed is read back from it.
        """
        leader, follower = os.openpty()
        try:
            proc = subprocess.Popen(
                [str(command), "-c", str(self.config_directory), *args],
                stdin=subprocess.DEVNULL,
                stdout=follower,
                stderr=follower,
            )
            os.close(follower)
            follower = -1
            chunks: list[bytes] = []
            deadline = time.monotonic() + 60
            # Read until the terminal is closed or, since the daemonized master may keep
            # it open, until the command has exited and nothing more is waiting.
            while True:
                exited = proc.poll() is not None
                ready, _, _ = select.select([leader], [], [], 0 if exited else 0.05)
                if ready:
                    try:
                        chunk = os.read(leader, 4096)
                    except OSError:  # EIO: every writer has closed the terminal
                        chunk = b""
                    if chunk:
                        chunks.append(chunk)
                        continue
                    proc.wait(max(0.1, deadline - time.monotonic()))
                    break
                if exited:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    break
        finally:
            os.close(leader)
            if follower >= 0:
                os.close(follower)
        output = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
        return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")

    def _run_checked(self, command: Path, *args: str) -> None:
        result = self._run(command, *args)
        output = (result.stdout + result.stderr).strip()
        if args == ("check",):
            self.check_output = output
        if result.returncode != 0 or "warning" in output or "fatal" in output:
            raise PostfixError(
                f"postfix {' '.join(args)} failed ({result.returncode}):\n{output}\n"
                f"{self.log()[-4000:]}"
            )

    def _refuse_busy_port(self) -> None:
        """Fail if something already answers on ``address:port``: an instance left over
        from an interrupted run would otherwise greet in our place."""
        try:
            with socket.create_connection(self.smtp_address, timeout=2):
                pass
        except OSError:
            return
        raise PostfixError(
            f"{self.address}:{self.port} is already in use (another Postfix instance, or a "
            f"test server?); `ss -ltnp 'sport = :{self.port}'` shows who listens there"
        )

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_directory / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError, RuntimeError):
            return None

    def _wait_master_pid(self) -> int:
        path = self.queue_directory / "pid" / "master.pid"
        deadline = time.monotonic() + self.start_timeout
        while True:
            pid = self._read_master_pid()
            if pid is not None:
                return pid
            if time.monotonic() > deadline:
                raise PostfixError(f"no {path} after postfix start:\n{self.log()[-4000:]}")
            time.sleep(0.02)

    def _wait_greeting(self, deadline: float) -> None:
        """Wait until ``smtpd`` answers ``220`` with this instance's token in the banner
        (the master forks smtpd on the first connection, so an accepting port alone proves
        little, and the token proves that the answer is ours)."""
        last_error = ""
        while True:
            if self.master_pid is not None and not self.processes():
                raise PostfixError(f"the Postfix master exited at start:\n{self.log()[-4000:]}")
            try:
                with socket.create_connection(self.smtp_address, timeout=2) as conn:
                    conn.settimeout(max(0.5, deadline - time.monotonic()))
                    greeting = b""
                    while not greeting.endswith(b"\n"):
                        chunk = conn.recv(512)
                        if not chunk:
                            break
                        greeting += chunk
                    if greeting.startswith(b"220 ") and self._token.encode() in greeting:
                        conn.sendall(b"QUIT\r\n")
                        with contextlib.suppress(OSError):
                            conn.recv(512)
                        return
                    last_error = repr(greeting)
            except OSError as exc:
                last_error = str(exc)
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"Postfix did not greet on {self.address}:{self.port} within "
                    f"{self.start_timeout}s ({last_error}):\n{self.log()[-4000:]}"
                )
            time.sleep(0.02)

    def _reap(self) -> None:
        """``postfix stop``, then wait until the instance's process group is empty.

        The master leads its own session (it daemonizes), so its pid is the group id of every
        Postfix process it started. ``postfix stop`` sends it SIGTERM; the master passes that
        on to its children and exits. Whatever is still alive after 10 s gets SIGKILL.
        """
        if self.directory is None or not self._start_attempted:
            return
        if self.master_pid is None:
            self.master_pid = self._read_master_pid()
        # Always: "not running" is harmless, and a master whose pid we missed still stops.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self._run(find_postfix(), "stop")
        if self.master_pid is None:
            return
        pgid = self.master_pid
        began = time.monotonic()
        while self.processes():
            now = time.monotonic()
            if now - began > 10:
                kill_group(pgid)
            if now - began > 20:
                raise PostfixError(f"Postfix processes left running: {self.processes()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop Postfix (nothing stays running) and remove the directory unless ``keep``."""
        try:
            self._reap()
        finally:
            self.master_pid = None
            self._start_attempted = False
            if self.directory is not None:
                self._final_log = self.log()
                if not self.keep:
                    shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<PostfixInstance {self.directory} {self.address}:{self.port} "
            f"pid={self.master_pid} domain={self.domain}>"
        )
