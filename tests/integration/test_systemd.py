"""systemd (issue 17, item 4): the notify protocol, the unit file, log rotation.

    test ──binds──▶ unix datagram socket ◀──READY=1 / WATCHDOG=1 / RELOADING=1 / STOPPING=1──┐
                                                                                         │
    test ──NOTIFY_SOCKET, WATCHDOG_USEC, SIGHUP, SIGUSR1, SIGTERM──▶ postillon serve ─────┘

systemd itself is not running here, so the test plays its part: it binds the socket
``$NOTIFY_SOCKET`` names, starts the real ``postillon serve`` with it, and reads what the
server says. The unit file goes through the real ``systemd-analyze verify`` and
``security``; the logrotate snippet through the real ``logrotate`` against a running
server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from postillon.provision.templates import render_logrotate, render_unit

if TYPE_CHECKING:
    from conftest import MakeServer

pytestmark = pytest.mark.integration


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: one datagram per notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.received.append(message)
        return message

    def wait_for(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """The next message carrying ``key`` (watchdog pings in between are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_systemd() -> Iterator[FakeSystemd]:
    # A short path: sun_path holds 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="notify-", dir="/tmp") as directory:
        fake = FakeSystemd(Path(directory) / "notify")
        yield fake
        fake.close()


def test_ready_watchdog_reload_and_stop_are_notified(
    make_server: MakeServer, fake_systemd: FakeSystemd
) -> None:
    server = make_server()
    server.env = {"NOTIFY_SOCKET": str(fake_systemd.path), "WATCHDOG_USEC": "200000"}
    server.start()
    ready = fake_systemd.wait_for("READY")
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(server.proc.pid)
    assert "smtp:127.0.0.1:" in ready["STATUS"]
    # READY=1 means the listener accepts and the queue is open: a message goes through.
    queue_id = server.send_message("alice@example.org")
    assert "delivered" in server.wait_outcome(queue_id)

    # The watchdog: pinged every WATCHDOG_USEC/2 from the event loop.
    pings = 0
    while pings < 3:
        if fake_systemd.next().get("WATCHDOG") == "1":
            pings += 1

    server.proc.send_signal(signal.SIGHUP)
    reloading = fake_systemd.wait_for("RELOADING")
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    again = fake_systemd.wait_for("READY")
    assert again["STATUS"] == "serving; configuration reloaded"

    # A refused reload still ends in READY=1 (the old config serves), saying why.
    server.config_path.write_text("this is not toml [\n")
    server.proc.send_signal(signal.SIGHUP)
    fake_systemd.wait_for("RELOADING")
    refused = fake_systemd.wait_for("READY")
    assert refused["STATUS"].startswith("serving; reload refused"), refused

    server.proc.send_signal(signal.SIGTERM)
    stopping = fake_systemd.wait_for("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert server.proc.wait(timeout=30) == 0


def test_no_ready_when_the_server_cannot_start(
    make_server: MakeServer, fake_systemd: FakeSystemd
) -> None:
    server = make_server(domain=[{"name": "example.org", "catch_all": "nobody"}])
    server.env = {"NOTIFY_SOCKET": str(fake_systemd.path)}
    with pytest.raises(RuntimeError, match="exited early"):
        server.start()
    messages = []
    with pytest.raises(TimeoutError):
        while True:
            messages.append(fake_systemd.next(timeout=1.0))
    assert not [m for m in messages if "READY" in m], messages


def test_helper_processes_do_not_inherit_the_notify_socket(
    make_server: MakeServer, fake_systemd: FakeSystemd
) -> None:
    # Inbound checks on: the helper process verifies DKIM signatures.
    server = make_server(helper_processes=1, authentication={"enabled": True})
    server.env = {"NOTIFY_SOCKET": str(fake_systemd.path)}
    server.start()
    fake_systemd.wait_for("READY")
    (helper,) = server.helper_pids()
    environ = Path(f"/proc/{helper}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"NOTIFY_SOCKET=")]


def test_sigusr1_reopens_the_log_file_that_logrotate_made(
    make_server: MakeServer, tmp_path: Path
) -> None:
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    assert Path(logrotate).exists(), "logrotate missing: run scripts/install-system-deps.sh"
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    server = make_server(log={"format": "text", "file": str(log_dir / "postillon.log")})
    server.start()
    log_file = log_dir / "postillon.log"
    first = server.send_message("alice@example.org")
    _wait_for_text(log_file, f"{first}: delivered")

    snippet = tmp_path / "logrotate.conf"
    snippet.write_text(
        render_logrotate(
            log_dir=log_dir,
            user=_name(os.getuid()),
            group=_group(os.getgid()),
            reopen_command=f"kill -USR1 {server.proc.pid}",
        )
    )
    subprocess.run(
        [logrotate, "--force", "--state", str(tmp_path / "state"), str(snippet)],
        check=True,
        timeout=60,
    )
    rotated = log_dir / "postillon.log.1"
    assert f"{first}: delivered" in rotated.read_text()
    _wait_for_text(log_file, "log reopened (SIGUSR1)")
    second = server.send_message("bob@example.org")
    _wait_for_text(log_file, f"{second}: delivered")
    assert f"{second}" not in rotated.read_text()
    # SIGUSR1 reopened the log and did nothing else: no reload.
    assert "reload" not in log_file.read_text()


def _wait_for_text(path: Path, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}:\n{path.read_text() if path.exists() else ''}")


def _name(uid: int) -> str:
    import pwd

    return pwd.getpwuid(uid).pw_name


def _group(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing: run scripts/install-system-deps.sh (package systemd)"
    return tool


def _unit(tmp_path: Path) -> Path:
    postillon = Path(sys.executable).parent / "postillon"
    assert postillon.exists()
    unit = tmp_path / "postillon.service"
    unit.write_text(
        render_unit(
            postillon=postillon,
            config=Path("/etc/postillon/postillon.toml"),
            data_dir=Path("/var/lib/postillon"),
            user="postillon",
        )
    )
    return unit


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _unit(tmp_path)
    text = unit.read_text()
    for line in (
        "Type=notify",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/postillon",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert line in text
    result = subprocess.run(
        [_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "postillon.service" not in result.stderr, result.stderr  # no warning about it


def test_unit_file_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The verify above would notice a mistake: a missing program is one."""
    unit = _unit(tmp_path)
    unit.write_text(unit.read_text().replace(str(Path(sys.executable).parent), "/nonexistent"))
    result = subprocess.run(
        [_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "/nonexistent/postillon" in result.stderr


def test_unit_file_security_exposure_is_low(tmp_path: Path) -> None:
    result = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", str(_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for postillon.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    # docs/install.md reports the score (2.6 when written); 10 is "UNSAFE".
    assert float(match.group(1)) <= 3.0, result.stdout


def test_smtp_connect_right_after_ready(make_server: MakeServer, fake_systemd: FakeSystemd) -> None:
    """READY=1 comes after the bind: the very first connection attempt succeeds."""
    server = make_server()
    server.env = {"NOTIFY_SOCKET": str(fake_systemd.path)}
    server.write_config()
    env = {**os.environ, **server.env}
    env.pop("POSTILLON_CONFIG", None)
    server.proc = subprocess.Popen(
        [*server.cli_command(), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    fake_systemd.wait_for("READY")
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as client:
        assert client.noop()[0] == 250
