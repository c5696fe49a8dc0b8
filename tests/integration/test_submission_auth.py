"""Submission with SMTP AUTH over real sockets (RFC 6409, RFC 8314, RFC 4954).

    smtplib / swaks / SCRAM client ──STARTTLS or TLS──▶ Listener + Session ──▶ intake ──▶ store
                                          │
                                          └── CredentialStore (test) + AuthGuard (per-IP budget)

The server runs in-process (Listener + SessionDeps, as app.py wires them) on
127.0.0.1 with an in-memory queue; blocking clients run in threads.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import shutil
import smtplib
import ssl
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from postillon.checks.pipeline import Pipeline
from postillon.checks.relay import RelayPolicy
from postillon.checks.relay_check import RelayCheck
from postillon.config.model import DomainConfig, LimitsConfig, ListenConfig
from postillon.core.account import Account, ScramCredentials
from postillon.core.clock import SystemClock
from postillon.inbound.auth import (
    DEFAULT_MECHANISMS,
    Authenticator,
    AuthGuard,
    mechanism_factories,
    scram_credentials,
    scram_primitives,
)
from postillon.inbound.limits import ConnectionLimiter
from postillon.inbound.listener import Listener
from postillon.inbound.session import SessionDeps
from postillon.inbound.tls import ensure_self_signed, server_context
from postillon.intake.intake import Intake
from postillon.observability.maillog import MailLog
from postillon.protocol.server import ServerSettings
from postillon.queue.memory_store import MemoryStore
from postillon.routing.local import LocalRecipients
from support.ports import free_port

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"
MESSAGE = "From: alice@example.org\r\nTo: bob@remote.test\r\nSubject: hi\r\n\r\nhello\r\n"


class MemoryCredentials:
    """A small CredentialStore for tests (the real one is inbound/accounts.py)."""

    def __init__(self) -> None:
        self.accounts = {"alice": Account("alice", ("alice@example.org",))}
        self.passwords = {"alice": PASSWORD}
        self.scram = {"alice": scram_credentials(PASSWORD, b"0123456789abcdef", 4096)}

    def verify_password(self, username: str, password: str) -> Account | None:
        known = self.passwords.get(username, "")
        ok = hmac.compare_digest(known.encode(), password.encode())
        return self.accounts[username] if ok and username in self.accounts else None

    def scram_credentials(self, username: str) -> ScramCredentials | None:
        return self.scram.get(username)

    def get(self, username: str) -> Account | None:
        return self.accounts.get(username)


class RecordingLog(MailLog):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def event(self, event: str, queue_id: str = "", /, **fields: Any) -> None:
        self.events.append((event, fields))


@dataclass
class Server:
    port: int
    store: MemoryStore
    log: RecordingLog
    kind: str = ""
    credentials: MemoryCredentials | None = None
    delays: list[float] = field(default_factory=list)


async def start(
    tmp_path: Path, kind: str, credentials: MemoryCredentials | None = None
) -> AsyncIterator[Server]:
    cert, key = ensure_self_signed(tmp_path / "tls", "mx.test")
    ctx = server_context(cert, key)
    store = MemoryStore()
    log = RecordingLog()
    server = Server(0, store, log, kind)

    async def sleep(delay: float) -> None:
        server.delays.append(delay)
        await asyncio.sleep(0)

    guard = AuthGuard(delay_after=3, delay_step=0.5, max_failures=10, sleep=sleep)
    auth = Authenticator(
        credentials or MemoryCredentials(), guard, mechanism_factories(scram_primitives())
    )
    local = LocalRecipients(
        [DomainConfig(name="example.org", mailboxes=("alice",))], {}, hostname="mx.test"
    )
    settings = ServerSettings(
        "mx.test",
        starttls=kind == "submission",
        tls_active=kind == "submissions",
        auth_mechanisms=DEFAULT_MECHANISMS,
        require_auth=True,
    )
    deps = SessionDeps(
        settings=settings,
        intake=Intake(store, "mx.test", tmp_path / "spool", maillog=log),
        pipeline=Pipeline([RelayCheck(RelayPolicy(local, []))], SystemClock()),
        maillog=log,
        limits=LimitsConfig(),
        listener=kind,
        tls_context=ctx,
        auth=auth,
    )
    port = free_port()
    config = ListenConfig(kind=kind, address=f"127.0.0.1:{port}")
    listener = Listener(
        config, ConnectionLimiter(100, 100), implicit_tls=ctx if kind == "submissions" else None
    )
    await listener.bind()
    await listener.start(deps)
    server.port = listener.bound_port
    try:
        yield server
    finally:
        listener.stop_accepting()
        await listener.wait_sessions(5)


@pytest.fixture
async def submission(tmp_path: Path) -> AsyncIterator[Server]:
    async for server in start(tmp_path, "submission"):
        yield server


@pytest.fixture
async def submissions(tmp_path: Path) -> AsyncIterator[Server]:
    async for server in start(tmp_path, "submissions"):
        yield server


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def starttls_client(port: int, source: str = "127.0.0.1") -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))
    s.ehlo("client.test")
    s.starttls(context=client_tls())
    s.ehlo("client.test")
    return s


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain(user: str, password: str) -> str:
    return "PLAIN " + b64(f"\0{user}\0{password}".encode())


async def received_headers(store: MemoryStore) -> list[bytes]:
    out = []
    for info in await store.list_messages():
        out.append(
            b"".join([c async for c in store.read_body(info.queue_id)]).split(b"\r\n\r\n")[0]
        )
    return out


async def test_plain_and_login_over_starttls(submission: Server) -> None:
    def run() -> None:
        with smtplib.SMTP("127.0.0.1", submission.port, timeout=10) as s:
            s.ehlo("client.test")
            assert not s.has_extn("auth")  # never before TLS
            code, msg = s.docmd("AUTH", plain("alice", PASSWORD))
            assert code == 538
            code, msg = s.mail("alice@example.org")
            assert (code, msg[:5]) == (530, b"5.7.0")
            s.starttls(context=client_tls())
            s.ehlo("client.test")
            assert s.esmtp_features["auth"].split() == ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
            code, msg = s.docmd("AUTH", plain("alice", "wrong"))
            assert (code, msg[:5]) == (535, b"5.7.8")
            s.login("alice", PASSWORD)  # PLAIN (smtplib's preference among ours)
            code, _ = s.docmd("AUTH", "LOGIN")
            assert code == 503  # AUTH after AUTH
            s.sendmail("alice@example.org", ["bob@remote.test"], MESSAGE)  # relay: authenticated
        with starttls_client(submission.port) as s:
            s.user, s.password = "alice", PASSWORD
            code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
            assert code == 235
            s.sendmail("alice@example.org", ["bob@remote.test"], MESSAGE)

    await asyncio.to_thread(run)
    headers = await received_headers(submission.store)
    assert len(headers) == 2
    assert all(b"with ESMTPSA" in h for h in headers)
    failed = [f for e, f in submission.log.events if e == "auth_failed"]
    assert failed and failed[0]["username"] == "alice"
    assert not any("wrong" in str(f) for _, f in submission.log.events)  # no passwords


async def test_implicit_tls_submissions(submissions: Server) -> None:
    def run() -> None:
        with smtplib.SMTP_SSL("127.0.0.1", submissions.port, timeout=10, context=client_tls()) as s:
            s.ehlo("client.test")
            assert "PLAIN" in s.esmtp_features["auth"]
            assert s.mail("alice@example.org")[0] == 530
            s.rset()
            s.login("alice", PASSWORD)
            s.sendmail("alice@example.org", ["bob@remote.test"], MESSAGE)

    await asyncio.to_thread(run)
    (header,) = await received_headers(submissions.store)
    assert b"with ESMTPSA" in header


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_auth(submission: Server, mechanism: str) -> None:
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed: run `make system-deps` (Debian package swaks)")
    proc = await asyncio.create_subprocess_exec(
        "swaks",
        "--server", f"127.0.0.1:{submission.port}",
        "--tls",
        "--auth", mechanism,
        "--auth-user", "alice",
        "--auth-password", PASSWORD,
        "--from", "alice@example.org",
        "--to", "bob@remote.test",
        "--helo", "client.test",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "235 2.7.0" in text
    (header,) = await received_headers(submission.store)
    assert b"with ESMTPSA" in header


def scram_login(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """A SCRAM-SHA-256 client (RFC 5802 §3) over smtplib.docmd; swaks has none."""
    cnonce = base64.b64encode(b"client-nonce-1234").decode()
    bare = f"n={user},r={cnonce}"
    code, msg = s.docmd("AUTH", "SCRAM-SHA-256 " + b64(("n,," + bare).encode()))
    assert code == 334, msg
    server_first = base64.b64decode(msg).decode()
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    assert attrs["r"].startswith(cnonce)
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    code, msg = s.docmd(b64(f"{without_proof},p={b64(proof)}".encode()))
    if code != 334:
        return code, msg
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    expected = "v=" + b64(hmac.digest(server_key, auth_message, "sha256"))
    assert base64.b64decode(msg).decode() == expected  # the server knows the key too
    return s.docmd("")


async def test_scram_sha256(submission: Server) -> None:
    def run() -> None:
        with starttls_client(submission.port) as s:
            assert scram_login(s, "alice", "wrong")[0] == 535
            assert scram_login(s, "nobody", PASSWORD)[0] == 535
            code, msg = scram_login(s, "alice", PASSWORD)
            assert (code, msg[:5]) == (235, b"2.7.0")
            s.sendmail("alice@example.org", ["bob@remote.test"], MESSAGE)

    await asyncio.to_thread(run)
    (header,) = await received_headers(submission.store)
    assert b"with ESMTPSA" in header


async def test_brute_force_is_slowed_and_cut_off_per_ip(submission: Server) -> None:
    """50 wrong passwords from 127.0.0.1; a correct login from 127.0.0.2 still works."""

    def attack() -> dict[int, int]:
        answers: dict[int, int] = {}
        tries = 0
        while tries < 50:
            try:
                with starttls_client(submission.port, "127.0.0.1") as s:
                    for _ in range(5):
                        tries += 1
                        code, _ = s.docmd("AUTH", plain("alice", f"guess{tries}"))
                        answers[code] = answers.get(code, 0) + 1
                        if code != 535:
                            break
            except smtplib.SMTPServerDisconnected:
                answers[-1] = answers.get(-1, 0) + 1
        return answers

    answers = await asyncio.to_thread(attack)
    assert answers.get(535, 0) == 9  # the 10th failure closes with 421
    assert answers.get(421, 0) + answers.get(-1, 0) >= 40
    assert submission.delays == [0.5 * n for n in range(1, 7)]  # growing delays (4th..9th)
    assert sum(e == "auth_failed" for e, _ in submission.log.events) >= 10

    def legit(source: str) -> int:
        with starttls_client(submission.port, source) as s:
            return s.docmd("AUTH", plain("alice", PASSWORD))[0]

    assert await asyncio.to_thread(legit, "127.0.0.2") == 235
    assert await asyncio.to_thread(legit, "127.0.0.1") == 421  # that address is blocked


class GatedCredentials(MemoryCredentials):
    """Holds every password check until the test opens the gate: the slow hash,
    stretched so that every parallel guess is in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.checked = 0

    def verify_password(self, username: str, password: str) -> Account | None:
        with self.lock:
            self.checked += 1
        self.gate.wait(60)
        return super().verify_password(username, password)


@pytest.fixture(params=["submission", "submissions"])
async def gated(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    creds = GatedCredentials()
    # Enough worker threads that every check the server starts is running (and
    # counted) at once: the default pool of 2 cores' size would queue them.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(40))
    async for server in start(tmp_path, request.param, creds):
        server.credentials = creds
        yield server


async def test_parallel_guesses_stay_within_the_failure_budget(gated: Server) -> None:
    """30 sessions from one address guess at once (STARTTLS and implicit TLS);
    the budget is 10 failures.

    The guard used to be asked before the check and told after it, so every
    guess in flight passed (30 checked). Now an attempt takes its slot first:
    10 are checked, the others get 454 4.7.0 without a check.
    """
    creds = gated.credentials
    assert isinstance(creds, GatedCredentials)
    answers: list[int] = []

    def guess(n: int) -> None:
        try:
            if gated.kind == "submissions":
                s = smtplib.SMTP_SSL("127.0.0.1", gated.port, timeout=60, context=client_tls())
                s.ehlo("client.test")
            else:
                s = starttls_client(gated.port)
            with s:
                answers.append(s.docmd("AUTH", plain("alice", f"guess{n}"))[0])
        except smtplib.SMTPServerDisconnected:
            answers.append(-1)  # the 10th failure: 421 and closed

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(30)]

    def run() -> None:
        for t in threads:
            t.start()
        # Every guess is either held in a check or answered without one.
        deadline = time.monotonic() + 60
        while creds.checked + len(answers) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        creds.gate.set()
        for t in threads:
            t.join(60)

    await asyncio.to_thread(run)
    assert creds.checked == 10
    assert answers.count(454) == 20  # refused unchecked: "try again later"
    assert answers.count(535) == 9
    assert answers.count(421) + answers.count(-1) == 1
