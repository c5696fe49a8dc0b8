"""The ``sendmail`` entry point driven as cron drives it.

printf '...' | sendmail -t -i ──▶ <data_dir>/maildrop/ ──▶ pickup (in postillon serve)
                                                         ──▶ intake ──▶ queue ──▶ Maildir

With the server running the message arrives; with it stopped the command
still exits 0, the file waits in the maildrop, and it arrives once the server
is started again. Also as an unprivileged user (``nobody``) when the tests run
as root.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import postillon.app
from support.server import ServerProcess, default_config

pytestmark = pytest.mark.integration

SENDMAIL = Path(sys.executable).parent / "sendmail"
MESSAGE = b"To: alice@example.org\nBcc: bob@example.org\nSubject: cron\n\nhi\n.\nstill here\n"

# Until app.py starts the pickup task in ``postillon serve``, a side process
# runs it against the server's queue (the runner polls the store, so it
# delivers what another process committed). Once app.py wires Pickup, the
# side process is not started and the test exercises the server alone.
PICKUP_IN_SERVER = "Pickup(" in inspect.getsource(postillon.app)

_SIDECAR = """
import asyncio, signal, sys
from pathlib import Path
from postillon.build import build_local_recipients
from postillon.paths import queue_path
from postillon.checks.relay import RelayPolicy
from postillon.config.loader import load_config
from postillon.intake.intake import Intake
from postillon.intake.maildrop import prepare_maildrop
from postillon.intake.pickup import Pickup
from postillon.queue.sqlite_store import SqliteStore
from postillon.core.recipient import RecipientAccepted

async def main():
    config = load_config(Path(sys.argv[1]))
    relay = RelayPolicy(build_local_recipients(config), ())
    def expand(address):
        decision = relay.check_recipient(address, "", authenticated=True)
        return decision.targets if isinstance(decision, RecipientAccepted) else (str(address),)
    store = SqliteStore(queue_path(config))
    intake = Intake(store, config.hostname, config.data_dir / "spool-pickup")
    pickup = Pickup(prepare_maildrop(config.data_dir / "maildrop"), intake, config.hostname,
                    expand=expand)
    pickup.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await pickup.stop()
    await store.close()

asyncio.run(main())
"""


class Server:
    """A ServerProcess plus, while app.py lacks the pickup, its side process."""

    def __init__(self, proc: ServerProcess) -> None:
        self.proc = proc
        self.sidecar: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.proc.start()
        if not PICKUP_IN_SERVER:
            self.sidecar = subprocess.Popen(
                [sys.executable, "-c", _SIDECAR, str(self.proc.config_path)],
                stderr=open(self.proc.root / "sidecar.log", "ab"),  # noqa: SIM115
            )
            deadline = time.monotonic() + 20
            while not (self.maildrop / "corrupt").is_dir():
                alive = self.sidecar.poll() is None and time.monotonic() < deadline
                assert alive, (self.proc.root / "sidecar.log").read_text()
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.sidecar is not None:
            self.sidecar.send_signal(signal.SIGTERM)
            self.sidecar.wait(30)
            self.sidecar = None
        self.proc.stop()

    @property
    def maildrop(self) -> Path:
        return self.proc.data_dir / "maildrop"

    def waiting(self) -> list[Path]:
        return [p for p in self.maildrop.iterdir() if p.is_file()]

    def sendmail(
        self, *args: str, stdin: bytes = MESSAGE, as_user: str | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        env["POSTILLON_CONFIG"] = str(self.proc.config_path)
        cmd = [str(SENDMAIL), *args]
        if as_user is not None:
            cmd = ["setpriv", f"--reuid={as_user}", "--regid=nogroup", "--clear-groups", *cmd]
        return subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=60)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[[Path], Server]]:
    made: list[Server] = []

    def build(root: Path) -> Server:
        root.mkdir(exist_ok=True)
        server = Server(ServerProcess(root, default_config(root)))
        made.append(server)
        return server

    yield build
    for server in made:
        server.stop()


def _check_delivered(server: Server, count: int) -> bytes:
    found = server.proc.wait_for_mail("alice@example.org", count)
    body = found[-1].read_bytes()
    assert b"Subject: cron" in body and b"\nhi\n" in body.replace(b"\r\n", b"\n")
    assert b"still here" in body  # -i: the lone "." did not end the message
    assert b"Bcc" not in body
    assert b"Received: from local (uid " in body
    return body


def test_cron_with_server_running_then_stopped(
    make: Callable[[Path], Server], tmp_path: Path
) -> None:
    assert SENDMAIL.exists(), "pip install -e . installs the sendmail entry point"
    server = make(tmp_path / "srv").start()

    done = server.sendmail("-t", "-i")
    assert done.returncode == 0, done.stderr
    body = _check_delivered(server, 1)
    assert b"Message-ID: <" in body and b"Date: " in body
    server.proc.wait_for_mail("bob@example.org", 1)  # Bcc'd, still delivered

    server.stop()
    done = server.sendmail("-t", "-i")
    assert done.returncode == 0, done.stderr
    assert len(server.waiting()) == 1  # kept in the maildrop, not lost
    server.start()
    _check_delivered(server, 2)
    assert server.waiting() == []


def test_without_dot_option_a_lone_dot_ends_the_message(
    make: Callable[[Path], Server], tmp_path: Path
) -> None:
    server = make(tmp_path / "srv").start()
    done = server.sendmail("-t")
    assert done.returncode == 0, done.stderr
    body = server.proc.wait_for_mail("alice@example.org", 1)[0].read_bytes()
    assert b"hi" in body and b"still here" not in body


def test_usage_errors_and_mailq(make: Callable[[Path], Server], tmp_path: Path) -> None:
    server = make(tmp_path / "srv").start()
    assert server.sendmail("-Z").returncode == 64
    assert server.sendmail().returncode == 64  # no recipients and no -t
    assert server.sendmail("-oem", "-odi", "-t", "-i").returncode == 0  # unknown -o ignored
    listed = server.sendmail("-bp")
    assert listed.returncode == 0, listed.stderr
    aliases = server.sendmail("-bi")
    assert aliases.returncode == 0 and b"aliases checked" in aliases.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_works_as_an_unprivileged_user(make: Callable[[Path], Server]) -> None:
    # tmp_path's parents are private to root; this tree lets nobody reach the config.
    root = Path(tempfile.mkdtemp(prefix="postillon-sendmail-"))
    try:
        os.chmod(root, 0o711)
        server = make(root / "srv")
        os.chmod(root / "srv", 0o711)
        server.start()
        server.stop()  # server down: the file must wait, owned by nobody
        done = server.sendmail("-t", "-i", "-f", "ceo@bank.example", as_user="nobody")
        assert done.returncode == 0, done.stderr
        (waiting,) = server.waiting()
        assert waiting.stat().st_uid == int(
            subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout
        )
        # nobody cannot list the maildrop nor read the queue
        assert server.sendmail("-bp", as_user="nobody").returncode != 0
        server.start()
        body = _check_delivered(server, 1)
        assert b"X-Authentication-Warning:" in body and b"using -f" in body
        assert b"Return-Path: <ceo@bank.example>" not in body
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_oversized_maildrop_file_is_set_aside(make_server) -> None:  # type: ignore[no-untyped-def]
    # A maildrop file written without the command (which checks the size itself):
    #   write_drop ──▶ maildrop/ ──▶ pickup: larger than [limits] message_size
    #                                  ──▶ maildrop/corrupt/ + a log line, nothing queued
    from postillon.intake.maildrop import DropEnvelope, write_drop

    server: ServerProcess = make_server(limits={"message_size": 100_000}).start()
    maildrop = server.data_dir / "maildrop"
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200  # 200 KB
    name = write_drop(maildrop, DropEnvelope(("alice@example.org",)), big).name
    small = write_drop(
        maildrop, DropEnvelope(("bob@example.org",)), b"Subject: small\r\n\r\nhi\r\n"
    )
    server.wait_for_mail("bob@example.org")  # scanned after the big one (names sort by time)
    assert not small.exists()
    assert (maildrop / "corrupt" / name).exists()
    log = server.wait_for_log(f"maildrop file {name}")
    assert f"maildrop file {name}: message too large (200016 octets" in log
    assert server.maildir_messages("alice@example.org") == []
    deadline = time.monotonic() + 20  # bob's record is final just after his file lands
    while server.cli("queue", "list", "--json").stdout.strip() != "[]":
        assert time.monotonic() < deadline, server.cli("queue", "list").stdout
        time.sleep(0.2)
