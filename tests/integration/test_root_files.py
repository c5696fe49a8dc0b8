"""Files root handles in the service user's data directory (issue 18, item 6).

    the service user (plants links, edits postillon.pid)
        │
        ▼
    <data_dir>  ◀── postillon serve (root, then user = "postillon")
                ◀── postillon admin token / reload / newaliases / user add (run as root)

The data directory belongs to the unprivileged user the server drops to. Whatever
that user plants there (a symlink where root will write, a hard link to a root
file, another process's pid) must not make root write, chown or signal anything
outside it. Each test plants what a hostile service user could and then drives
the real server and CLI as root.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import smtplib
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.ports import free_port
from support.server import ServerProcess, default_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)"),
]

PRECIOUS = b"root's file: nobody else may change it\n"


@pytest.fixture
def user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postillon")
    except KeyError:
        pytest.fail("system user 'postillon' missing: run `make system-deps`")


@pytest.fixture
def root_dir() -> Iterator[Path]:
    # pytest's tmp dirs are 0700 root; the dropped process must reach its data_dir.
    root = Path(tempfile.mkdtemp(prefix="postillon-rootfiles-"))
    root.chmod(0o755)
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


def _victim(root: Path, name: str) -> Path:
    """A file only root may change, which a planted link will point at."""
    path = root / name
    path.write_bytes(PRECIOUS)
    path.chmod(0o644)
    return path


def _assert_untouched(path: Path) -> None:
    st = os.lstat(path)
    assert path.read_bytes() == PRECIOUS, f"root wrote through a planted link into {path}"
    assert (st.st_uid, st.st_gid) == (0, 0), f"{path} was given away"
    assert stat.S_IMODE(st.st_mode) == 0o644


def _plant_link(link: Path, target: Path, user: pwd.struct_passwd) -> None:
    """A symlink as the service user would make it (owned by them)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    os.lchown(link, user.pw_uid, user.pw_gid)


def _server(root: Path, **overrides: object) -> ServerProcess:
    config = default_config(root, **overrides)
    config["user"] = "postillon"
    return ServerProcess(root, config)


def _data_dir(root: Path) -> Path:
    return root / "var"


def _give(path: Path, user: pwd.struct_passwd) -> None:
    for p in (path, *path.rglob("*")):
        os.lchown(p, user.pw_uid, user.pw_gid)


def test_self_signed_certificate_is_never_written_through_a_planted_link(
    root_dir: Path, user: pwd.struct_passwd
) -> None:
    """The tls directory is the user's; root must not create the key or the
    certificate there by a name the user may have linked elsewhere."""
    tls = _data_dir(root_dir) / "tls"
    tls.mkdir(parents=True)
    key_victim, cert_victim = _victim(root_dir, "key-victim"), _victim(root_dir, "cert-victim")
    _plant_link(tls / "selfsigned-key.tmp", key_victim, user)
    _plant_link(tls / "selfsigned-cert.pem", cert_victim, user)
    _give(_data_dir(root_dir), user)
    server = _server(root_dir)
    try:
        server.start()
        _assert_untouched(key_victim)
        _assert_untouched(cert_victim)
        # And STARTTLS works with the certificate the server made for itself.
        host, _, port = server.config["listen"][0]["address"].rpartition(":")
        with smtplib.SMTP(host, int(port), timeout=10) as client:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            client.starttls(context=ctx)
            client.sendmail("a@sender.test", ["alice@example.org"], b"Subject: x\r\n\r\nhi\r\n")
        server.wait_for_mail("alice@example.org")
        key = tls / "selfsigned-key.pem"
        assert not key.is_symlink() and os.stat(key).st_uid == user.pw_uid
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    finally:
        server.stop()


def test_start_never_follows_a_symlinked_maildrop(root_dir: Path, user: pwd.struct_passwd) -> None:
    """The maildrop directory is chowned and chmodded (1733) as root on every start:
    a symlink in its place must stop the start, not hand over the directory it
    points to."""
    data = _data_dir(root_dir)
    data.mkdir()
    _give(data, user)
    victim_dir = root_dir / "victim-dir"
    victim_dir.mkdir()
    victim_dir.chmod(0o755)
    _plant_link(data / "maildrop", victim_dir, user)
    server = _server(root_dir)
    try:
        with pytest.raises(RuntimeError, match="maildrop"):
            server.start()
    finally:
        server.stop()
    st = os.stat(victim_dir)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755), "maildrop link followed"


def test_start_never_chowns_a_hard_link_to_a_root_file(
    root_dir: Path, user: pwd.struct_passwd
) -> None:
    """The chown walk over data_dir (as root, every start) must not give the user a
    root file hard-linked into the tree (possible on a kernel without
    fs.protected_hardlinks), nor anything reached through a symlink."""
    data = _data_dir(root_dir)
    (data / "queue").mkdir(parents=True)
    _give(data, user)
    hard_victim = _victim(root_dir, "hard-victim")
    os.link(hard_victim, data / "queue" / "planted")
    link_victim = _victim(root_dir, "link-victim")
    _plant_link(data / "spool" / "planted-link", link_victim, user)
    victim_dir = root_dir / "victim-dir"
    victim_dir.mkdir()
    inside = _victim(victim_dir, "inside")
    _plant_link(data / "mail" / "planted-dir", victim_dir, user)
    server = _server(root_dir)
    try:
        server.start()
        for victim in (hard_victim, link_victim, inside):
            _assert_untouched(victim)
        assert os.stat(victim_dir).st_uid == 0
        assert "planted" in server.maillog()  # it says what it left alone, and why
    finally:
        server.stop()


def _token_accepted(admin_port: int, token: str) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/api/status",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200 and json.load(response)
    except urllib.error.HTTPError as exc:
        pytest.fail(f"the running server refused the new token: {exc.code} {exc.read()!r}")


def test_admin_token_made_as_root_is_accepted_by_the_running_server(root_dir: Path) -> None:
    """The server runs as its user; the token file root writes must be readable by
    it (it used to be root's, mode 0600: the web page was locked out until restart)."""
    admin_port = free_port()
    server = _server(root_dir, admin={"listen": f"127.0.0.1:{admin_port}"})
    try:
        server.start()
        _token_accepted(admin_port, server.cli("admin", "token").stdout.strip())
    finally:
        server.stop()


def test_admin_token_as_root_never_writes_through_a_planted_link(
    root_dir: Path, user: pwd.struct_passwd
) -> None:
    admin_port = free_port()
    server = _server(root_dir, admin={"listen": f"127.0.0.1:{admin_port}"})
    try:
        server.start()
        victim = _victim(root_dir, "token-victim")
        _plant_link(_data_dir(root_dir) / "admin-token.json.tmp", victim, user)
        token = server.cli("admin", "token").stdout.strip()
        _assert_untouched(victim)
        _token_accepted(admin_port, token)
    finally:
        server.stop()


def test_reload_and_newaliases_never_signal_a_process_the_pid_file_names_wrongly(
    root_dir: Path, user: pwd.struct_passwd
) -> None:
    """postillon.pid is written by the server after the drop, so its user may put
    any pid there; root's `postillon reload` and `newaliases` must not signal it."""
    server = _server(root_dir)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        server.start()
        pid_file = _data_dir(root_dir) / "postillon.pid"
        for _ in range(100):
            if pid_file.exists():
                break
            time.sleep(0.05)
        real = pid_file.read_text()
        pid_file.write_text(f"{bystander.pid}\n")  # as the user could: the file is theirs
        reload = server.cli("reload", check=False)
        newaliases = subprocess.run(
            [sys.executable, "-m", "postillon.cli.sendmail", "-C", str(server.config_path), "-bi"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        time.sleep(0.2)
        assert bystander.poll() is None, "a bystander process was signalled"
        assert reload.returncode == 1, reload.stdout + reload.stderr
        assert "not postillon" in reload.stderr
        assert newaliases.returncode != 0 or "reload requested" not in newaliases.stdout
        # The real server's pid still gets its reload. (The reload itself is refused
        # here: the test's log file is root's, and a reload reopens it as the user.)
        pid_file.write_text(real)
        assert server.cli("reload").returncode == 0
        assert "reload refused" in server.wait_for_log("reload refused")
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()
        server.stop()


def test_user_add_as_root_never_opens_or_chowns_a_planted_lock_link(
    root_dir: Path, user: pwd.struct_passwd
) -> None:
    """`postillon user add` as root locks ``accounts.json.lock`` in data_dir and gives
    it to the directory's owner: through a planted link that was /etc/shadow's
    owner handed to the service user."""
    server = _server(root_dir)
    try:
        server.start()
        victim = _victim(root_dir, "lock-victim")
        _plant_link(_data_dir(root_dir) / "accounts.json.lock", victim, user)
        done = subprocess.run(
            [*server.cli_command(), "user", "add", "carol@example.org", "--password-stdin"],
            input="a long enough password\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        _assert_untouched(victim)
        assert done.returncode != 0 and "accounts.json.lock" in done.stderr, done.stderr
    finally:
        server.stop()


def test_dkim_keygen_as_root_never_writes_or_chowns_through_planted_links(
    root_dir: Path, user: pwd.struct_passwd
) -> None:
    """`postillon dkim keygen` as root writes into <data_dir>/dkim/<domain>/ and gives
    both directories and the key to the server's user: none of it by a name the
    user may have pointed elsewhere."""
    server = _server(root_dir)
    try:
        server.start()
        dkim = _data_dir(root_dir) / "dkim"
        dkim.mkdir()
        _give(dkim, user)
        victim_dir = root_dir / "victim-dir"
        victim_dir.mkdir()
        victim_dir.chmod(0o755)
        _plant_link(dkim / "example.org", victim_dir, user)
        done = server.cli("dkim", "keygen", "example.org", "--selector", "s1", check=False)
        st = os.stat(victim_dir)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755), "a linked dir was taken"
        assert not (victim_dir / "s1.key").exists(), "a key was written through the link"
        assert done.returncode != 0, done.stdout
        (dkim / "example.org").unlink()
        victim = _victim(root_dir, "key-victim")
        (dkim / "example.org").mkdir()
        _give(dkim, user)
        _plant_link(dkim / "example.org" / ".s2.key.tmp", victim, user)
        server.cli("dkim", "keygen", "example.org", "--selector", "s2")
        _assert_untouched(victim)
        key = dkim / "example.org" / "s2.key"
        assert (os.stat(key).st_uid, stat.S_IMODE(os.stat(key).st_mode)) == (user.pw_uid, 0o600)
    finally:
        server.stop()


def test_queue_commands_as_root_never_write_through_planted_side_file_links(
    root_dir: Path, user: pwd.struct_passwd
) -> None:
    """`postillon queue …` as root opens the SQLite queue in the user's directory, and
    SQLite creates its side files (``queue.db-wal``, ``queue.db-shm``) by name. SQLite
    itself opens them with O_NOFOLLOW and, as root, gives new ones to the database
    file's owner; this test keeps it that way (a found-elsewhere check for item 6)."""
    server = _server(root_dir)
    server.start()
    server.stop()
    queue_dir = _data_dir(root_dir) / "queue"
    victims = {}
    for side in ("queue.db-wal", "queue.db-shm"):
        (queue_dir / side).unlink(missing_ok=True)
        victims[side] = _victim(root_dir, f"{side}-victim")
        _plant_link(queue_dir / side, victims[side], user)
    done = server.cli("queue", "list", check=False)
    for victim in victims.values():
        _assert_untouched(victim)
    # Without the links, the side files a root-run command leaves are the owner's.
    for side in victims:
        (queue_dir / side).unlink()
    server.cli("queue", "flush")
    owners = {p.name: os.lstat(p).st_uid for p in queue_dir.iterdir()}
    assert set(owners.values()) == {user.pw_uid}, (owners, done.stderr)
