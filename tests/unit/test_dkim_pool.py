"""The DKIM verifier processes (checks/dkim_pool.py, checks/dkim_worker.py), real ones:
their answers equal inline verification; when one cannot answer (a key not sent, the
process killed) the caller is told to verify inline, and a dead worker is replaced."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from test_dkimcore import RECORDS, lookup, sign

from postillon.checks.dkim_pool import DkimVerifierPool
from postillon.checks.dkim_worker import verify
from postillon.dkimcore.verify import verify_message

MESSAGE = b"From: A <a@x.example>\r\nSubject: pooled\r\n\r\nbody  text\r\n"


def signed_twice() -> bytes:
    once = sign(MESSAGE, b"rsa-sha256", (b"relaxed", b"relaxed"))
    return sign(once, b"ed25519-sha256", (b"relaxed", b"simple"))


def rows_inline(message: bytes) -> list[tuple[str, str]]:
    return [(r.result, r.signature.selector) for r in verify_message(message, lookup)]


async def test_answers_match_inline_verification() -> None:
    pool = DkimVerifierPool(2)
    await pool.start()
    try:
        assert len(pool.worker_pids) == 2
        good = signed_twice()
        bad = good.replace(b"body", b"BODY")
        keys = dict(RECORDS)
        answers = await asyncio.gather(
            *(pool.verify(m, keys) for m in (good, bad, MESSAGE) * 5)  # type: ignore[arg-type]
        )
        for message, rows in zip((good, bad, MESSAGE) * 5, answers, strict=True):
            assert rows is not None
            assert [(r[0], r[3]) for r in rows] == rows_inline(message)
        assert [r[0] for r in answers[0]] == ["pass", "pass"]  # type: ignore[index]
        assert [r[0] for r in answers[1]] == ["fail", "fail"]  # type: ignore[index]
        assert answers[2] == []  # unsigned
        # A key the server could not fetch, and one it did not send.
        temp = await pool.verify(good, {**keys, "ed._domainkey.x.example": "SERVFAIL"})
        assert temp is not None and [r[0] for r in temp] == ["temperror", "pass"]
        assert (
            await pool.verify(
                good, {"rsa._domainkey.x.example": RECORDS["rsa._domainkey.x.example"]}
            )
            is None
        )
    finally:
        await pool.close()
    assert pool.worker_pids == []


async def test_a_killed_worker_means_inline_then_a_new_worker() -> None:
    pool = DkimVerifierPool(1, restart_interval=0.2)
    await pool.start()
    try:
        (pid,) = pool.worker_pids
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # the reader sees the pipe close
            if not pool.worker_pids:
                break
            await asyncio.sleep(0.02)
        assert await pool.verify(signed_twice(), dict(RECORDS)) is None  # inline, meanwhile
        for _ in range(200):
            await asyncio.sleep(0.05)
            rows = await pool.verify(signed_twice(), dict(RECORDS))
            if rows is not None:
                break
        assert rows is not None and [r[0] for r in rows] == ["pass", "pass"]
        assert pool.worker_pids and pool.worker_pids[0] != pid
    finally:
        await pool.close()


def test_worker_verify_reports_an_unparseable_header() -> None:
    rows = verify(b" starts with a blank\r\n\r\nbody\r\n", {})
    assert rows is not None and rows[0][0] == "permerror" and "unparseable" in rows[0][1]


@pytest.mark.parametrize("count", [0, 3])
async def test_resize(count: int) -> None:
    pool = DkimVerifierPool(1, restart_interval=0.0)
    await pool.start()
    try:
        pool.resize(count)
        for _ in range(200):
            if len(pool.worker_pids) == count:
                break
            pool.submit(MESSAGE, {})  # a request is what starts missing workers
            await asyncio.sleep(0.05)
        assert len(pool.worker_pids) == count
    finally:
        await pool.close()


async def test_keys_the_quick_scan_missed_are_fetched_for_inline_verification() -> None:
    """The fallback when no verifier answers: a signature whose key the server did not
    prefetch is looked up then, not reported as a temporary error."""
    from postillon.checks.blocking_dns import BlockingDns
    from postillon.checks.dkim_check import verify_dkim_message
    from postillon.routing.resolver import Answer, DnsNotFound, TxtRecord

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
