"""The certificate manager's decisions without a CA: when to renew, how it backs off, and
how cluster nodes share one renewal through the store's lease (the ACME order itself is
replaced by a stub; tests/integration/test_acme_pebble.py runs the real one)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trustme

from postillon.certs import manager as manager_module
from postillon.certs.acme_client import AcmeError, Issued, OrderSettings
from postillon.certs.challenges import ChallengeBoard
from postillon.certs.manager import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    CertificateManager,
    ManagerSettings,
    backoff,
)
from postillon.certs.storage import AcmeFiles, CertificateInfo
from postillon.queue.acme_state import MemoryAcmeState
from postillon.queue.store import SharedCertificate

NAMES = ("mx.acme.test", "mta-sts.acme.test")
SETTINGS = ManagerSettings(
    OrderSettings("https://ca.test/dir", NAMES, None, None, ("tls-alpn-01",))
)


def issued(ca: trustme.CA | None = None) -> Issued:
    leaf = (ca or trustme.CA()).issue_cert(*NAMES)
    return Issued(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())


def make(
    tmp_path: Path, name: str, store: MemoryAcmeState | None
) -> tuple[CertificateManager, list[int]]:
    applied: list[int] = []
    files = AcmeFiles(tmp_path / name)
    return CertificateManager(
        SETTINGS, files, ChallengeBoard(), lambda: applied.append(1), store
    ), applied


def test_renewal_at_two_thirds_of_the_lifetime_or_renew_before() -> None:
    info = CertificateInfo(NAMES, 0.0, 90 * 86400.0, "CN=ca", "1")
    assert info.renew_at(None) == 60 * 86400.0
    assert info.renew_at(7 * 86400.0) == 83 * 86400.0


def test_backoff_doubles_to_six_hours() -> None:
    assert FIRST_BACKOFF * 0.8 <= backoff(1) <= FIRST_BACKOFF
    assert 2 * FIRST_BACKOFF * 0.8 <= backoff(2) <= 2 * FIRST_BACKOFF
    assert MAX_BACKOFF * 0.8 <= backoff(40) <= MAX_BACKOFF


async def test_failure_keeps_the_certificate_and_backs_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr, applied = make(tmp_path, "a", None)
    first = issued()
    mgr.files.save(first.chain_pem, first.key_pem)
    assert mgr.load_kept()

    def refuse(*args: object) -> Issued:
        raise AcmeError("the CA refused the challenge: mx.acme.test: tls-alpn-01: nope")

    monkeypatch.setattr(manager_module, "obtain", refuse)
    wait = await mgr._attempt(forced=True)
    assert FIRST_BACKOFF * 0.8 <= wait <= FIRST_BACKOFF
    assert mgr.status.state == "failing" and mgr.status.failures == 1
    assert "nope" in mgr.status.last_error
    assert mgr.files.load() == (first.chain_pem, first.key_pem) and applied == []
    assert mgr.files.read_status()["state"] == "failing"  # type: ignore[index]


async def test_one_node_renews_the_others_load_its_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryAcmeState()
    a, applied_a = make(tmp_path, "a", store)
    b, applied_b = make(tmp_path, "b", store)
    orders: list[str] = []
    fresh = issued()

    def order(settings: OrderSettings, files: AcmeFiles, board: ChallengeBoard) -> Issued:
        orders.append(str(files.directory))
        return fresh

    monkeypatch.setattr(manager_module, "obtain", order)
    # Node a holds the lease (mid-order): b does not order, it waits for a's result.
    assert await store.take_lease(a._holder, time.time(), time.time() + 600)
    assert await b._attempt(forced=False) == FIRST_BACKOFF
    assert orders == [] and applied_b == []
    await a._attempt(forced=False)
    assert orders == [str(a.files.directory)] and applied_a == [1]
    shared = await store.certificate(NAMES)
    assert isinstance(shared, SharedCertificate) and shared.chain_pem == fresh.chain_pem
    # b's next check loads it: same certificate, applied to its listeners, no order.
    await b._load_shared()
    assert applied_b == [1] and b.files.load() == (fresh.chain_pem, fresh.key_pem)
    assert b.status.state == "ok" and orders == [str(a.files.directory)]
    await b._load_shared()  # not newer: nothing to do
    assert applied_b == [1]
    # a released its lease: b may renew now.
    assert await b._attempt(forced=True) != FIRST_BACKOFF
    assert len(orders) == 2
