"""The helper processes (postillon.helpers), real ones: DKIM verification and RSA signing
there give the same answers as in the server; when a helper cannot answer (a key it does
not hold, a key not sent, the process killed) the caller is told to do the work itself,
and a dead helper is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_dkimcore import RECORDS, lookup, sign

from postillon.config.loader import ConfigError, parse_config
from postillon.config.model import DkimConfig
from postillon.dkimcore.remote import verify
from postillon.dkimcore.verify import verify_message
from postillon.helpers.pool import HelperPool
from postillon.intake.dkim_sign import signature_fields
from postillon.signing.keys import KeyStore, load_key_store, write_new_key
from postillon.signing.remote_keys import shared_keys
from postillon.signing.signer import DkimSigner, MessageSigning, SigningPolicy
from support.ports import wait_until_async

MESSAGE = b"From: A <a@x.example>\r\nSubject: pooled\r\n\r\nbody  text\r\n"


def signed_twice() -> bytes:
    once = sign(MESSAGE, b"rsa-sha256", (b"relaxed", b"relaxed"))
    return sign(once, b"ed25519-sha256", (b"relaxed", b"simple"))


def rows_inline(message: bytes) -> list[tuple[str, str]]:
    return [(r.result, r.signature.selector) for r in verify_message(message, lookup)]


async def test_verify_answers_match_the_server() -> None:
    pool = HelperPool(2)
    await pool.start()
    try:
        assert len(pool.pids) == 2
        good = signed_twice()
        bad = good.replace(b"body", b"BODY")
        keys = dict(RECORDS)
        answers = await asyncio.gather(
            *(pool.call("verify", (m, keys)) for m in (good, bad, MESSAGE) * 5)
        )
        for message, rows in zip((good, bad, MESSAGE) * 5, answers, strict=True):
            assert rows is not None
            assert [(r[0], r[3]) for r in rows] == rows_inline(message)
        assert [r[0] for r in answers[0]] == ["pass", "pass"]
        assert [r[0] for r in answers[1]] == ["fail", "fail"]
        assert answers[2] == []  # unsigned
        # A key the server could not fetch, and one it did not send.
        temp = await pool.call("verify", (good, {**keys, "ed._domainkey.x.example": "SERVFAIL"}))
        assert temp is not None and [r[0] for r in temp] == ["temperror", "pass"]
        only_rsa = {"rsa._domainkey.x.example": RECORDS["rsa._domainkey.x.example"]}
        assert await pool.call("verify", (good, only_rsa)) is None
        assert await pool.call("no such kind", b"") is None
    finally:
        await pool.close()
    assert pool.pids == []


class ManualClock:
    """A ``LoopClock`` moved by hand: timers fire when :meth:`advance` reaches them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[ManualTimer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> ManualTimer:
        timer = ManualTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[ManualTimer]:
        return [t for t in self.timers if not t.cancelled]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [t for t in self.pending() if t.when <= self.now]
        self.timers = [t for t in self.pending() if t not in due]
        for timer in sorted(due, key=lambda t: t.when):
            timer.callback()


@dataclass
class ManualTimer:
    when: float
    callback: Callable[[], object]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


async def test_a_killed_helper_means_inline_then_a_new_helper_after_the_interval() -> None:
    clock = ManualClock()
    pool = HelperPool(1, restart_interval=5.0, clock=clock)
    pool.share("keys", {})
    await pool.start()
    try:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)
        await wait_until_async(lambda: not pool.pids, what="the reader sees the pipe close")
        assert await pool.call("verify", (signed_twice(), dict(RECORDS))) is None  # inline
        clock.advance(4.9)  # within the restart interval: no new helper yet
        assert await pool.call("verify", (signed_twice(), dict(RECORDS))) is None
        await asyncio.sleep(0)
        assert pool.pids == []
        clock.advance(0.1)
        assert await pool.call("verify", (signed_twice(), dict(RECORDS))) is None  # starts one
        await wait_until_async(lambda: pool.pids, what="a new helper")
        rows = await pool.call("verify", (signed_twice(), dict(RECORDS)))
        assert rows is not None and [r[0] for r in rows] == ["pass", "pass"]
        assert pool.pids[0] != pid
    finally:
        await pool.close()


async def test_a_stuck_helper_is_answered_for_after_the_timeout_and_replaced() -> None:
    clock = ManualClock()
    pool = HelperPool(1, restart_interval=0.0, clock=clock, answer_timeout=10.0)
    await pool.start()
    try:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)  # alive, holding the request, never answering
        call = asyncio.ensure_future(pool.call("verify", (signed_twice(), dict(RECORDS))))
        await wait_until_async(clock.pending, what="the answer timer")
        clock.advance(9.9)
        await asyncio.sleep(0.05)
        assert not call.done()
        clock.advance(0.1)
        assert await call is None  # the caller does the work itself
        await wait_until_async(lambda: pid not in pool.pids, what="the stuck helper killed")
        pool.submit("verify", (MESSAGE, {}))  # a request starts the missing helper
        await wait_until_async(lambda: pool.pids, what="a new helper")
        assert await pool.call("verify", (MESSAGE, {})) == []
        assert clock.pending() == []  # answered in time: every timer cancelled
    finally:
        await pool.close()


def test_verify_reports_an_unparseable_header() -> None:
    rows = verify(b" starts with a blank\r\n\r\nbody\r\n", {})
    assert rows is not None and rows[0][0] == "permerror" and "unparseable" in rows[0][1]


@pytest.mark.parametrize("count", [0, 3])
async def test_resize(count: int) -> None:
    pool = HelperPool(1, restart_interval=0.0)
    await pool.start()
    try:
        pool.resize(count)
        for _ in range(200):
            if len(pool.pids) == count:
                break
            pool.submit("verify", (MESSAGE, {}))  # a request is what starts missing helpers
            await asyncio.sleep(0.05)
        assert len(pool.pids) == count
    finally:
        await pool.close()


async def test_keys_the_quick_scan_missed_are_fetched_for_inline_verification() -> None:
    """The fallback when no helper answers: a signature whose key the server did not
    prefetch is looked up then, not reported as a temporary error."""
    from postillon.checks.blocking_dns import BlockingDns
    from postillon.checks.dkim_check import verify_dkim_message
    from postillon.dns.resolver import Answer, DnsNotFound, TxtRecord

    class Records:
        def cached_txt(self, name: str) -> Answer[TxtRecord] | None:
            return None

        async def txt(self, name: str) -> Answer[TxtRecord]:
            if name not in RECORDS:
                raise DnsNotFound(name, "TXT", "NXDOMAIN")
            return Answer(name, (TxtRecord((RECORDS[name],)),), 300, name)

    bridge = BlockingDns(Records(), asyncio.get_running_loop())  # type: ignore[arg-type]
    results = await verify_dkim_message(signed_twice(), [], bridge, None)
    assert [r.result for r in results] == ["pass", "pass"]


# -- RSA signing -----------------------------------------------------------------------------

HEADER = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: hi\r\n"
    b"Date: Sun, 06 Dec 2026 07:00:00 +0000\r\n"
)
NOW = 1796540400.0


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    write_new_key(tmp_path / "dkim", "example.org", "r", "rsa")
    write_new_key(tmp_path / "dkim", "example.org", "e", "ed25519")
    return load_key_store(tmp_path / "dkim")


def signing(keys: KeyStore) -> MessageSigning:
    config = DkimConfig()
    signer = DkimSigner(keys, SigningPolicy.create(config.headers, config.oversign))
    started = signer.start(HEADER + b"\r\n", "alice@example.org", client_ip="", authenticated=True)
    assert started is not None
    started.update(b"Hello  there\r\n" * 50)
    return started


def counting_pool() -> tuple[HelperPool, dict[tuple[str, bool], int]]:
    """A real pool, and how many requests of each kind a helper (True) or nobody
    (False: the server does the work) answered."""
    answered: dict[tuple[str, bool], int] = {}

    def seen(kind: str, by_helper: bool) -> None:
        answered[(kind, by_helper)] = answered.get((kind, by_helper), 0) + 1

    return HelperPool(1, on_answer=seen), answered


async def test_rsa_signatures_from_a_helper_equal_the_servers(keys: KeyStore) -> None:
    """RSASSA-PKCS1-v1_5 is deterministic: the fields must be byte for byte the same."""
    pool, answered = counting_pool()
    pool.share("keys", shared_keys(list(keys)))
    await pool.start()
    try:
        inline = await signature_fields(signing(keys), NOW, None)
        remote = await signature_fields(signing(keys), NOW, pool)
        assert remote == inline and remote.count(b"DKIM-Signature:") == 2
        assert answered == {("sign", True): 1}  # the RSA one; Ed25519 is signed inline
    finally:
        await pool.close()


async def test_a_key_the_helper_does_not_hold_is_signed_by_the_server(keys: KeyStore) -> None:
    pool, answered = counting_pool()
    await pool.start()  # no keys shared
    try:
        (rsa_key,) = [k for k in keys if k.algorithm == "rsa"]
        assert await pool.call("sign", (rsa_key.fingerprint, b"\0" * 32)) is None
        inline = await signature_fields(signing(keys), NOW, None)
        assert await signature_fields(signing(keys), NOW, pool) == inline
        assert answered == {("sign", False): 2}
        # Keys shared later reach the running helper; a new set replaces the old one.
        pool.share("keys", shared_keys(list(keys)))
        assert await signature_fields(signing(keys), NOW, pool) == inline
        assert answered[("sign", True)] == 1
        pool.share("keys", {})
        assert await pool.call("sign", (rsa_key.fingerprint, b"\0" * 32)) is None
    finally:
        await pool.close()


async def test_signing_survives_a_killed_helper(keys: KeyStore) -> None:
    pool, answered = counting_pool()
    pool.share("keys", shared_keys(list(keys)))
    await pool.start()
    try:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)
        inline = await signature_fields(signing(keys), NOW, None)
        # Whether the helper is seen dead before or after the request is sent, the
        # message is signed, the same.
        assert await signature_fields(signing(keys), NOW, pool) == inline
        assert answered == {("sign", False): 1}
    finally:
        await pool.close()


def test_a_key_has_one_fingerprint_per_public_key(tmp_path: Path, keys: KeyStore) -> None:
    write_new_key(tmp_path / "other", "example.org", "r", "rsa")
    (again,) = [k for k in load_key_store(tmp_path / "other") if k.algorithm == "rsa"]
    (first,) = [k for k in keys if k.algorithm == "rsa"]
    (reread,) = [k for k in load_key_store(tmp_path / "dkim") if k.algorithm == "rsa"]
    assert first.fingerprint == reread.fingerprint != again.fingerprint
    assert set(shared_keys(list(keys))) == {first.fingerprint}  # RSA only


def test_helper_processes_config() -> None:
    assert parse_config({"helper_processes": 2}).helper_process_count() == 2
    assert parse_config({}).helper_process_count() == (1 if (os.cpu_count() or 1) > 1 else 0)
    with pytest.raises(ConfigError, match="between 0 and 64"):
        parse_config({"helper_processes": 65})
    # The key's old name and place: refused, naming the new one.
    with pytest.raises(ConfigError, match="now helper_processes, at the top level"):
        parse_config({"authentication": {"verify_processes": 1}})


def test_the_helper_program_stays_small() -> None:
    """Each helper costs memory for as long as the server runs: it must not load the
    config model (pydantic) or the server's other parts, only what its work needs."""
    import subprocess
    import sys

    probe = (
        "import sys, postillon.helpers.process\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pydantic', 'postillon.config',"
        " 'postillon.inbound.', 'postillon.queue', 'asyncio', 'dkim'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout
