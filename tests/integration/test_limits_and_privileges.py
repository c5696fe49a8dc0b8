"""Resource limits and privilege dropping, against the real server.

raw sockets ──▶ postillon serve (limits from config) ──▶ 421 / timeouts
"""

from __future__ import annotations

import os
import pwd
import smtplib
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

from support.ports import accepts, free_port, wait_until
from support.server import ServerProcess, default_config

pytestmark = pytest.mark.integration


def _connect(server: ServerProcess) -> socket.socket:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_ehlo(sock: socket.socket) -> bytes:
    """The whole multi-line EHLO reply (up to its ``250 `` line)."""
    data = b""
    while not (data.startswith(b"250 ") or b"\r\n250 " in data) or not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _greeted(server: ServerProcess, count: int) -> list[socket.socket]:
    """``count`` sessions that each got ``220``, once the server has freed enough slots
    (it frees one when it notices a close: start()'s probe, or a test's own close)."""
    opened: list[socket.socket] = []

    def attempt() -> list[socket.socket] | None:
        while len(opened) < count:
            sock = _connect(server)
            if not _read_reply(sock).startswith(b"220"):  # 421: that slot is not free yet
                sock.close()
                return None
            opened.append(sock)
        return opened

    return wait_until(attempt, 10, f"{count} free connection slot(s)")


def test_connections_per_ip_limit(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(limits={"connections_per_ip": 2}).start()
    first, second = _greeted(server, 2)
    third = _connect(server)
    assert _read_reply(third).startswith(b"421 4.7.0")
    third.close()
    first.close()
    (fourth,) = _greeted(server, 1)
    for s in (second, fourth):
        s.close()


def test_idle_client_gets_421_after_command_timeout(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(limits={"command_timeout": 0.5}).start()
    sock = _connect(server)
    assert _read_reply(sock).startswith(b"220")
    assert _read_reply(sock).startswith(b"421 4.4.2")
    assert sock.recv(100) == b""  # and the connection is closed
    sock.close()


def test_slow_data_times_out_and_nothing_is_queued(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(limits={"data_timeout": 0.5}).start()
    sock = _connect(server)
    _read_reply(sock)
    sock.sendall(b"EHLO c.test\r\n")
    _read_ehlo(sock)  # EHLO ends a pipelined group (RFC 2920 §3.1): wait for its reply
    sock.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    deadline = time.monotonic() + 5
    buf = b""
    while b"354" not in buf and time.monotonic() < deadline:
        buf += sock.recv(4096)
    sock.sendall(b"Subject: half a message\r\n")
    buf = b""
    while b"421" not in buf and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    assert b"421 4.4.2" in buf
    sock.close()
    assert server.cli("queue", "list", "--json").stdout.strip() == "[]"


def test_too_many_errors_closes_the_session(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(limits={"errors": 3}).start()
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        assert s.rcpt("x@example.org")[0] == 550
        assert s.rcpt("y@example.org")[0] == 550
        assert s.rcpt("z@example.org")[0] == 550
        # The 421 follows the third error unasked; the next read finds it.
        code, msg = s.noop()
        assert code == 421 and msg.startswith(b"4.7.0")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()


def test_sigterm_lets_a_transaction_finish(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server().start()
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    s = smtplib.SMTP(host, int(port), timeout=10)
    s.ehlo("c.test")
    s.mail("a@sender.test")
    s.rcpt("alice@example.org")
    assert server.proc is not None
    server.proc.send_signal(15)
    # New connections are refused while the running session may finish.
    wait_until(lambda: not accepts(host, int(port)), 10, "the listener closed")
    with pytest.raises(OSError):
        _connect(server).recv(10)
    code, _ = s.data(b"Subject: during shutdown\r\n\r\nbody\r\n")
    assert code == 250
    s.quit()
    assert server.proc.wait(30) == 0
    server.start()
    server.wait_for_mail("alice@example.org")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root (CI runs as root)")
def test_root_drops_privileges_after_binding() -> None:
    try:
        entry = pwd.getpwnam("postillon")
    except KeyError:
        pytest.fail("system user 'postillon' missing: run `make system-deps`")
    # pytest's tmp dirs are 0700 root; the dropped process must reach its data_dir.
    root = Path(tempfile.mkdtemp(prefix="postillon-priv-"))
    root.chmod(0o755)
    config = default_config(root)
    config["user"] = "postillon"
    server = ServerProcess(root, config)
    try:
        server.start()
        assert server.proc is not None
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {str(entry.pw_uid)}
        host, _, port = config["listen"][0]["address"].rpartition(":")
        with smtplib.SMTP(host, int(port), timeout=10) as s:
            s.sendmail("a@sender.test", ["alice@example.org"], b"Subject: x\r\n\r\nbody\r\n")
        (path,) = server.wait_for_mail("alice@example.org")
        assert path.stat().st_uid == entry.pw_uid
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root (CI runs as root)")
def test_after_dropping_privileges_the_helper_and_admin_server_work() -> None:
    """The helper process is started before the drop and drops to the same user
    itself, and what the admin server loads late is loaded before the drop: both must
    work when the server's user cannot read the interpreter's own library (a Python
    under /root, as on CI)."""
    entry = pwd.getpwnam("postillon")
    root = Path(tempfile.mkdtemp(prefix="postillon-priv-"))
    root.chmod(0o755)
    admin_port = free_port()
    config = default_config(
        root,
        authentication={"enabled": True, "temperror": "accept"},
        helper_processes=1,
        dns={"nameservers": ["127.0.0.1:9"], "timeout": 0.5, "attempts": 1},
        admin={"listen": f"127.0.0.1:{admin_port}"},
    )
    config["user"] = "postillon"
    server = ServerProcess(root, config)
    try:
        server.start()
        assert server.proc is not None
        workers = server.helper_pids()
        assert len(workers) == 1, server.maillog()
        status = Path(f"/proc/{workers[0]}/status").read_text()
        for _ in range(100):  # it drops right after its imports
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            if set(uid_line.split()[1:]) == {str(entry.pw_uid)}:
                break
            time.sleep(0.05)
            status = Path(f"/proc/{workers[0]}/status").read_text()
        assert set(uid_line.split()[1:]) == {str(entry.pw_uid)}
        with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert conn.recv(64).split(b" ")[1] == b"200"
        host, _, port = config["listen"][0]["address"].rpartition(":")
        with smtplib.SMTP(host, int(port), timeout=10) as s:
            s.sendmail("a@sender.test", ["alice@example.org"], b"Subject: x\r\n\r\nbody\r\n")
        server.wait_for_mail("alice@example.org")
        assert "dkim=none" in server.maillog() and "Traceback" not in server.maillog()
    finally:
        server.stop()
