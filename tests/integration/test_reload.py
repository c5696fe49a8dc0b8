"""Reload (SIGHUP and ``postillon reload``) under load: no message lost, no
connection refused, the new config in effect; a broken config is refused and
the old one kept; the log file is reopened for logrotate.

    6 smtplib clients ──▶ postillon serve ──▶ queue ──▶ Maildir
                              ▲ SIGHUP / postillon reload, 6 times, each with a
                                new alias and (every other time) a new certificate
"""

from __future__ import annotations

import re
import signal
import smtplib
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import trustme

from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration

CLIENTS = 6
RELOADS = 6
PER_SESSION = 5  # messages per connection: clients reconnect all the time


def _addr(server: ServerProcess) -> tuple[str, int]:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    return host, int(port)


def _wait_log(server: ServerProcess, text: str, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while server.maillog().count(text) < count:
        assert time.monotonic() < deadline, (
            f"{text!r} not logged {count} times:\n{server.maillog()[-3000:]}\n{server.stderr()}"
        )
        time.sleep(0.05)


def _issue(ca: trustme.CA, root: Path, n: int) -> tuple[Path, Path, bytes]:
    """A new certificate for the server's name; returns paths and its DER bytes."""
    cert = ca.issue_cert("mx.test.example")
    cert_path, key_path = root / f"cert{n}.pem", root / f"key{n}.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    return cert_path, key_path, der


def _presented_certificate(address: tuple[str, int]) -> bytes:
    with smtplib.SMTP(*address, timeout=10) as client:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        client.starttls(context=ctx)
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
        assert der is not None
        return der


def _rcpt(address: tuple[str, int], recipient: str) -> int:
    with smtplib.SMTP(*address, timeout=10) as client:
        client.ehlo("check.test")
        client.mail("a@sender.test")
        code, _ = client.rcpt(recipient)
        return int(code)


class Load:
    """Clients sending without pause; every failure is recorded, none retried."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.acked: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(CLIENTS)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def _client(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                with smtplib.SMTP(*self.address, timeout=20) as client:
                    for _ in range(PER_SESSION):
                        token = f"c{n}-m{i}"
                        i += 1
                        body = f"Subject: load {token}\r\nX-Token: {token}\r\n\r\n" + "x" * 2000
                        client.sendmail("load@sender.test", ["team@example.org"], body)
                        with self.lock:
                            self.acked.append(token)
            except (OSError, smtplib.SMTPException) as exc:
                with self.lock:
                    self.failures.append(f"client {n}: {exc!r}")
                return


def _delivered_tokens(server: ServerProcess, address: str) -> Counter[str]:
    tokens: Counter[str] = Counter()
    for path in server.maildir_messages(address):
        m = re.search(rb"X-Token: (\S+)", path.read_bytes())
        if m:
            tokens[m.group(1).decode()] += 1
    return tokens


def test_reload_under_load(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    cert, key, first_der = _issue(ca, tmp_path, 0)
    domains = [
        {
            "name": "example.org",
            "mailboxes": ["alice", "bob", "postmaster"],
            "aliases": {"team": ["alice", "bob"]},
        }
    ]
    server: ServerProcess = make_server(
        domain=domains, tls={"certificate": str(cert), "private_key": str(key)}
    ).start()
    address = _addr(server)
    assert _presented_certificate(address) == first_der
    assert server.proc is not None
    pid = server.proc.pid

    latest_der = first_der
    with Load(address) as load:
        for n in range(1, RELOADS + 1):
            target = load.count() + 40
            while load.count() < target and not load.failures:
                time.sleep(0.01)
            # Each reload adds an alias; every other one a new certificate.
            aliases = dict(domains[0]["aliases"])  # type: ignore[call-overload]
            aliases.update({f"new{k}": ["bob"] for k in range(1, n + 1)})
            server.config["domain"] = [{**domains[0], "aliases": aliases}]
            if n % 2 == 0:
                cert, key, latest_der = _issue(ca, tmp_path, n)
                server.config["tls"] = {"certificate": str(cert), "private_key": str(key)}
            server.write_config()
            if n % 2:
                server.proc.send_signal(signal.SIGHUP)
            else:
                result = server.cli("reload")
                assert f"pid {pid}" in result.stdout
            _wait_log(server, "configuration reloaded", n)
            # The new config is in effect while the load goes on.
            assert _rcpt(address, f"new{n}@example.org") == 250
            assert _presented_certificate(address) == latest_der
        sent_during_reloads = load.count()
    assert not load.failures, load.failures[:5]
    assert server.proc.poll() is None and server.proc.pid == pid

    acked = set(load.acked)
    deadline = time.monotonic() + 60
    while True:
        alice, bob = (
            _delivered_tokens(server, "alice@example.org"),
            _delivered_tokens(server, "bob@example.org"),
        )
        if (acked <= set(alice) and acked <= set(bob)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(
        f"reload under load: {RELOADS} reloads, {sent_during_reloads} messages acknowledged, "
        f"{len(load.failures)} failures"
    )
    assert not acked - set(alice), "messages lost (alice)"
    assert not acked - set(bob), "messages lost (bob)"
    assert max(alice.values()) == 1 and max(bob.values()) == 1, "delivered twice"
    assert "need a restart" not in server.maillog()


def test_invalid_config_is_refused_and_old_one_kept(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server().start()
    address = _addr(server)
    assert server.proc is not None
    good = server.config_path.read_text()

    # Not valid: a bad key and a bad value. Signalled directly (the CLI would
    # refuse before signalling, see below).
    server.config_path.write_text(good + "\n[limits]\nrecipients = 5\nbogus = 1\n")
    server.proc.send_signal(signal.SIGHUP)
    _wait_log(server, "reload refused", 1)
    log = server.maillog()
    assert "limits.recipients" in log and "limits.bogus" in log
    # The old config is in force: team still expands, the server still serves.
    assert _rcpt(address, "team@example.org") == 250
    with smtplib.SMTP(*address, timeout=10) as client:
        client.sendmail("a@sender.test", ["alice@example.org"], "Subject: after\r\n\r\nok\r\n")
    server.wait_for_mail("alice@example.org")

    cli = server.cli("reload", check=False)
    assert cli.returncode == 2 and "limits.bogus" in cli.stderr

    # A config that parses but names a missing certificate is refused too.
    server.config_path.write_text(
        good.replace(
            "[relay]", '[tls]\ncertificate = "missing.pem"\nprivate_key = "missing.key"\n\n[relay]'
        )
    )
    server.proc.send_signal(signal.SIGHUP)
    _wait_log(server, "reload refused", 2)
    assert _rcpt(address, "team@example.org") == 250

    # Settings that need a restart are applied no further than the log line.
    server.config_path.write_text(good.replace('user = ""', 'user = "nobody"'))
    server.proc.send_signal(signal.SIGHUP)
    _wait_log(server, "configuration reloaded", 1)
    assert "need a restart to take effect: user" in server.maillog()


def test_reload_reopens_the_log_file(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server().start()
    address = _addr(server)
    with smtplib.SMTP(*address, timeout=10) as client:
        client.sendmail("a@sender.test", ["alice@example.org"], "Subject: one\r\n\r\n1\r\n")
    server.wait_for_mail("alice@example.org")
    rotated = server.log_path.with_name("mail.log.1")
    server.log_path.rename(rotated)  # what logrotate does, then `postillon reload`
    assert server.cli("reload").returncode == 0
    _wait_log(server, "configuration reloaded", 1)
    with smtplib.SMTP(*address, timeout=10) as client:
        client.sendmail("a@sender.test", ["bob@example.org"], "Subject: two\r\n\r\n2\r\n")
    server.wait_for_mail("bob@example.org")
    _wait_log(server, "delivered: to=<bob@example.org>", 1)
    assert "bob@example.org" not in rotated.read_text()
    assert "alice@example.org" not in server.maillog()


def test_reload_without_a_running_server(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server()
    server.write_config()
    result = server.cli("reload", check=False)
    assert result.returncode == 1 and "no running server" in result.stderr


def test_reload_rereads_aliases_file_and_refuses_broken_accounts(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(aliases={"files": ["aliases"]})
    aliases = server.root / "aliases"
    aliases.write_text("sales: alice\n")
    server.start()
    address = _addr(server)
    assert _rcpt(address, "sales@example.org") == 250
    assert _rcpt(address, "support@example.org") == 550

    aliases.write_text("sales: alice\nsupport: bob\n")
    assert server.cli("reload").returncode == 0
    _wait_log(server, "configuration reloaded", 1)
    assert _rcpt(address, "support@example.org") == 250

    # A damaged accounts file refuses the reload (and so would a broken aliases file).
    (server.data_dir / "accounts.json").write_text("{not json")
    aliases.write_text("sales: alice\n")
    assert server.cli("reload").returncode == 0  # the config itself is fine
    _wait_log(server, "reload refused", 1)
    assert "accounts.json: damaged accounts file" in server.maillog()
    assert _rcpt(address, "support@example.org") == 250  # the old aliases stay


def test_reload_applies_outbound_settings(make_server) -> None:  # type: ignore[no-untyped-def]
    """[outbound] takes effect with new transports: B sees the new HELO name.

    smtplib ──▶ A ──smtp:[127.0.0.1]:Q (HELO first.test, then second.test)──▶ B ──▶ Maildir
    """
    b_port = free_port()
    b: ServerProcess = make_server(
        listen=[{"kind": "smtp", "address": f"127.0.0.1:{b_port}"}],
        domain=[{"name": "remote.test", "mailboxes": ["bob"]}],
    ).start()
    a: ServerProcess = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        transport=[{"domain": "remote.test", "route": f"smtp:[127.0.0.1]:{b_port}"}],
        outbound={"helo_name": "first.test", "idle_reuse": 0.0},
    ).start()
    address = _addr(a)
    for n, helo in enumerate(("first.test", "second.test"), start=1):
        if n == 2:
            a.config["outbound"] = {"helo_name": "second.test", "idle_reuse": 0.0}
            a.write_config()
            assert a.cli("reload").returncode == 0
            _wait_log(a, "configuration reloaded", 1)
        with smtplib.SMTP(*address, timeout=10) as client:
            client.sendmail("s@sender.test", ["bob@remote.test"], f"Subject: {n}\r\n\r\nx\r\n")
        texts = [p.read_bytes() for p in b.wait_for_mail("bob@remote.test", n)]
        assert sum(f"from {helo} ".encode() in t for t in texts) == 1
    assert "need a restart" not in a.maillog()


SMTP_SOURCE = "/usr/sbin/smtp-source"


def test_reload_under_smtp_source_load(make_server) -> None:  # type: ignore[no-untyped-def]
    """Postfix's load generator, one message per connection, 10 in parallel,
    while SIGHUP reloads the server again and again. smtp-source stops with
    exit status 1 at the first refused connection or rejected reply.

    smtp-source -s 10 -m 1500 ──▶ postillon serve ──▶ Maildir (alice, bob)
                                      ▲ SIGHUP every 0.2 s
    """
    import subprocess

    server: ServerProcess = make_server().start()
    assert server.proc is not None
    host, port = _addr(server)
    messages = 1500
    args = ["-s", "10", "-m", str(messages), "-l", "2000", "-f", "load@sender.test"]
    load = subprocess.Popen(
        [SMTP_SOURCE, *args, "-t", "team@example.org", f"{host}:{port}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    reloads = 0
    while load.poll() is None:
        server.proc.send_signal(signal.SIGHUP)
        reloads += 1
        time.sleep(0.2)
    assert load.wait() == 0, load.stderr.read() if load.stderr else ""
    _wait_log(server, "configuration reloaded", min(reloads, 3))
    server.wait_for_mail("alice@example.org", messages, timeout=60)
    server.wait_for_mail("bob@example.org", messages, timeout=60)
    log = server.maillog()
    print(f"smtp-source: {messages} messages, {log.count('configuration reloaded')} reloads")
    assert log.count(": received: ") == messages
    assert len(server.maildir_messages("alice@example.org")) == messages
    assert "reload refused" not in log


def test_reload_new_certificate_on_implicit_tls_listener(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The submissions socket (TLS from the first byte, RFC 8314) keeps its
    context object; a reload loads the new certificate into it."""
    ca = trustme.CA()
    cert, key, first = _issue(ca, tmp_path, 0)
    smtp_port, tls_port = free_port(), free_port()
    server: ServerProcess = make_server(
        listen=[
            {"kind": "smtp", "address": f"127.0.0.1:{smtp_port}"},
            {"kind": "submissions", "address": f"127.0.0.1:{tls_port}"},
        ],
        tls={"certificate": str(cert), "private_key": str(key)},
    ).start()

    def presented() -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=10, context=ctx) as client:
            assert isinstance(client.sock, ssl.SSLSocket)
            der = client.sock.getpeercert(binary_form=True)
            assert der is not None
            return der

    assert presented() == first
    cert, key, second = _issue(ca, tmp_path, 1)
    server.config["tls"] = {"certificate": str(cert), "private_key": str(key)}
    server.write_config()
    assert server.cli("reload").returncode == 0
    _wait_log(server, "configuration reloaded", 1)
    assert presented() == second
    assert _presented_certificate(("127.0.0.1", smtp_port)) == second


def test_newaliases_checks_the_aliases_and_reloads_the_server(make_server) -> None:  # type: ignore[no-untyped-def]
    # What an operator types after editing /etc/aliases.
    server: ServerProcess = make_server(aliases={"files": ["aliases"]})
    aliases = server.root / "aliases"
    aliases.write_text("sales: alice\n")
    server.start()
    address = _addr(server)
    assert _rcpt(address, "support@example.org") == 550

    aliases.write_text("sales: alice\nsupport: bob\n")
    result = server.cli("newaliases")
    assert "aliases checked" in result.stdout and "reload requested" in result.stdout
    _wait_log(server, "configuration reloaded", 1)
    assert _rcpt(address, "support@example.org") == 250

    # A broken file is reported, names the file and line, and nothing is signalled.
    aliases.write_text("sales: alice\nbroken line without a colon\n")
    result = server.cli("newaliases", check=False)
    assert result.returncode == 78  # EX_CONFIG
    assert "aliases" in result.stderr and "keeps its aliases" in result.stderr
    assert server.maillog().count("configuration reloaded") == 1
    assert _rcpt(address, "support@example.org") == 250
