"""``postillon setup`` (issue 17, item 2), run for real under ``--root``.

    postillon setup --root R ──▶ R/etc/postillon/postillon.toml   (check-config loads it)
                                 R/var/lib/postillon/dkim/…        (Ed25519 + RSA per domain)
                                 R/var/lib/postillon/accounts.json (the admin, password printed)
                                 R/usr/sbin/sendmail → alternatives → postillon's sendmail
                                 R/etc/systemd/system/postillon.service (systemd-analyze verify)
    postillon --config R/etc/postillon/postillon.toml serve ◀── submission on "587" as the admin

A second run changes nothing and says so; --dry-run changes nothing at all; an existing
config is replaced only with --force (and the old one kept beside it).
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.ports import free_port, stop_process

pytestmark = pytest.mark.integration

POSTILLON = [sys.executable, "-m", "postillon.cli.main"]
PROGRAMS = Path(sys.executable).parent


@pytest.fixture
def root() -> Iterator[Path]:
    # Under /tmp and world-searchable: the server drops to user postillon, which must
    # reach the data directory (pytest's own tmp directories are 0700).
    directory = Path(tempfile.mkdtemp(prefix="setup-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def setup(root: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [
        *POSTILLON,
        "setup",
        "--hostname",
        "mx.example.org",
        "--domain",
        "example.org",
        "--domain",
        "example.net",
        "--admin-email",
        "you@example.org",
        "--root",
        str(root),
        *extra,
    ]
    # As an installed postillon: the programs sit beside the interpreter.
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""}
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_mtime_ns, p.lstat().st_size)
        for p in root.rglob("*")
        if not p.name.endswith(".lock")
    }


def test_dry_run_changes_nothing(root: Path) -> None:
    result = setup(root, "--dry-run")
    assert "Would change:" in result.stdout
    assert "would: write config" in result.stdout
    assert "would: make a DKIM ed25519 key for example.org" in result.stdout
    assert list(root.iterdir()) == []


def test_setup_writes_a_working_installation_and_is_idempotent(root: Path) -> None:
    first = setup(root)
    out = first.stdout
    config = root / "etc/postillon/postillon.toml"
    checked = subprocess.run(
        [*POSTILLON, "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr
    assert "3 listener(s), 2 local domain(s)" in checked.stdout
    assert "4 DKIM key(s)" in checked.stdout
    text = config.read_text()
    for line in ('kind = "smtp"', '"0.0.0.0:25"', '"0.0.0.0:465"', '"0.0.0.0:587"'):
        assert line in text
    assert 'listen = "127.0.0.1:8025"' in text  # the admin page on loopback
    assert oct(config.stat().st_mode & 0o777) == "0o640"

    # DKIM: an Ed25519 and an RSA key per domain, their records printed.
    for domain in ("example.org", "example.net"):
        keys = sorted(p.name for p in (root / f"var/lib/postillon/dkim/{domain}").iterdir())
        assert [k[:2] for k in keys] == ["ed", "rs"]
        assert re.search(rf"ed\d{{6}}\._domainkey\.{domain}\. .*k=ed25519", out)
        assert re.search(rf"rsa\d{{6}}\._domainkey\.{domain}\. .*k=rsa", out)
        assert f"{domain}. 3600 IN MX 10 mx.example.org." in out
        assert f"dns check {domain}" in out
    # The admin's password, once.
    match = re.search(r"Mail account you@example.org, password \(shown only now\): (\S+)", out)
    assert match
    # sendmail through Debian's alternatives, inside the root.
    query = subprocess.run(
        ["update-alternatives", "--root", str(root), "--query", "sendmail"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"Value: {PROGRAMS / 'sendmail'}" in query.stdout
    assert os.readlink(root / "usr/sbin/sendmail") == "/etc/alternatives/sendmail"
    # The systemd unit, verified by systemd.
    unit = root / "etc/systemd/system/postillon.service"
    assert f"ExecStart={PROGRAMS / 'postillon'} --config {config} serve" in unit.read_text()
    assert f"ReadWritePaths={root / 'var/lib/postillon'}" in unit.read_text()
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0, verify.stderr

    before = snapshot(root)
    second = setup(root)
    assert "Nothing to change: everything is already set up." in second.stdout
    assert "password (shown only now)" not in second.stdout
    assert "mail account you@example.org exists (password unchanged)" in second.stdout
    assert snapshot(root) == before


def test_existing_config_is_kept_unless_forced(root: Path) -> None:
    setup(root)
    config = root / "etc/postillon/postillon.toml"
    config.write_text(config.read_text() + "# the operator's edit\n")
    kept = setup(root)
    assert "exists and is kept (--force replaces it)" in kept.stdout
    assert "# the operator's edit" in config.read_text()
    forced = setup(root, "--force")
    assert "wrote config" in forced.stdout
    assert "# the operator's edit" not in config.read_text()
    (backup,) = config.parent.glob("postillon.toml.*.bak")
    assert "# the operator's edit" in backup.read_text()
    # Keys and the account stay: a re-run never replaces a published key or a password.
    assert "DKIM rsa key for example.org exists" in forced.stdout
    assert "password (shown only now)" not in forced.stdout


def test_another_mtas_sendmail_is_left_alone(root: Path) -> None:
    sbin = root / "usr/sbin"
    sbin.mkdir(parents=True)
    (sbin / "sendmail").write_text("#!/bin/sh\n# postfix's\n")
    out = setup(root).stdout
    assert "usr/sbin/sendmail belongs to another mail system" in out
    assert (sbin / "sendmail").read_text() == "#!/bin/sh\n# postfix's\n"


def test_bad_arguments_are_refused(root: Path) -> None:
    result = setup(root, "--admin-email", "someone@elsewhere.test", check=False)
    assert result.returncode == 2
    assert "must be an address in one of the --domain" in result.stderr
    assert list(root.iterdir()) == []


def test_acme_directory_is_written_for_the_tls_config(root: Path) -> None:
    setup(root, "--acme-directory", "https://127.0.0.1:14000/dir")
    text = (root / "etc/postillon/postillon.toml").read_text()
    assert re.search(r"^acme = true$", text, re.M)
    assert re.search(r'^acme_directory = "https://127.0.0.1:14000/dir"$', text, re.M)
    assert re.search(r'^acme_email = "you@example.org"$', text, re.M)
    # TLS-ALPN-01 needs the HTTPS listener, which also serves the MTA-STS policy.
    assert "[mta_sts]" in text and 'listen = "0.0.0.0:443"' in text


def test_self_signed_leaves_acme_as_comments(root: Path) -> None:
    setup(root, "--self-signed")
    text = (root / "etc/postillon/postillon.toml").read_text()
    assert re.search(r"^self_signed = true$", text, re.M)
    assert re.search(r"^# acme = true$", text, re.M)
    assert "[mta_sts]" not in text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")
def test_the_server_runs_from_the_setup_and_takes_the_admins_mail(root: Path) -> None:
    smtp, submissions, submission, admin = free_port(), free_port(), free_port(), free_port()
    out = setup(
        root,
        "--listen-host",
        "127.0.0.1",
        "--ports",
        f"{smtp},{submissions},{submission}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--self-signed",  # no ACME CA in this test (test_acme_pebble covers ACME)
    ).stdout
    password = re.search(r"password \(shown only now\): (\S+)", out).group(1)  # type: ignore[union-attr]
    config = root / "etc/postillon/postillon.toml"
    # Tests never ask the machine's resolver (a closed port answers "refused").
    config.write_text(config.read_text() + '\n[dns]\nnameservers = ["127.0.0.1:9"]\n')
    env = {k: v for k, v in os.environ.items() if k != "POSTILLON_CONFIG"}
    proc = subprocess.Popen(
        [*POSTILLON, "--config", str(config), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        _wait_port(submission, proc)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the self-signed certificate (or Pebble's)
        with smtplib.SMTP("127.0.0.1", submission, timeout=30) as client:
            client.starttls(context=context)
            client.login("you@example.org", password)
            client.sendmail(
                "you@example.org",
                ["postmaster@example.net"],
                b"From: you@example.org\r\nTo: postmaster@example.net\r\n"
                b"Subject: first\r\n\r\nhello from setup\r\n",
            )
        new = root / "var/lib/postillon/mail/example.org/you/new"
        deadline = time.monotonic() + 30
        while not (new.is_dir() and any(new.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.1)
        (message,) = new.iterdir()
        data = message.read_bytes()
        assert b"hello from setup" in data
        assert b"DKIM-Signature:" in data  # signed with a key setup made
    finally:
        stop_process(proc, timeout=30)


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} never opened")
