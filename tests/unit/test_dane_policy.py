"""DaneHook's decision table (RFC 7672 §2.2) against a fake resolver: one row per DNS state."""

from __future__ import annotations

import pytest

from postillon.dns.resolver import Answer, DnsBogus, DnsNotFound, DnsTempError, TlsaRecord
from postillon.outbound.dane_policy import DaneHook, DaneRequirement, DaneUnreachable

GOOD = TlsaRecord(3, 1, 1, b"\x01" * 32)
PKIX = TlsaRecord(1, 1, 1, b"\x01" * 32)


class FakeResolver:
    def __init__(self, result: Answer[TlsaRecord] | Exception) -> None:
        self.result = result
        self.asked: list[str] = []

    async def tlsa(self, name: str) -> Answer[TlsaRecord]:
        self.asked.append(name)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def answer(*records: TlsaRecord, secure: bool = True) -> Answer[TlsaRecord]:
    return Answer("_25._tcp.mx.d.test", records, 60, "_25._tcp.mx.d.test", secure)


NAME = "_25._tcp.mx.d.test"


@pytest.mark.parametrize(
    ("mx", "addr", "result", "expected"),
    [
        (False, True, answer(GOOD), None),  # insecure MX: DANE does not apply, no lookup
        (True, False, answer(GOOD), None),  # insecure address records
        (True, True, answer(GOOD, secure=False), None),  # TLSA itself insecure
        (True, True, DnsNotFound(NAME, "TLSA", "no", nxdomain=False, authenticated=True), None),
        (True, True, answer(GOOD, PKIX), DaneRequirement("mx.d.test", (GOOD,), ("mx.d.test",))),
        (True, True, answer(PKIX), DaneRequirement("mx.d.test", (), ("mx.d.test",))),
        (True, True, DnsBogus(NAME, "TLSA", "SERVFAIL"), DaneUnreachable),
        (True, True, DnsTempError(NAME, "TLSA", "timeout"), DaneUnreachable),
        (True, True, RuntimeError("surprise"), DaneUnreachable),
    ],
)
async def test_requirement(mx: bool, addr: bool, result: object, expected: object) -> None:
    resolver = FakeResolver(result)  # type: ignore[arg-type]
    got = await DaneHook(resolver).requirement(  # type: ignore[arg-type]
        "mx.d.test", mx_secure=mx, address_secure=addr
    )
    if expected is DaneUnreachable:
        assert isinstance(got, DaneUnreachable)
        assert got.reason.startswith(f"DANE: TLSA lookup of {NAME} failed")
    else:
        assert got == expected
    assert resolver.asked == ([NAME] if mx and addr else [])


def test_check_without_usable_records_allows_unauthenticated_tls() -> None:
    check = DaneHook.check(DaneRequirement("mx.d.test", (), ("mx.d.test",)), [])
    assert (check.ok, check.verified, check.result) == (True, False, "dane-no-usable-tlsa")


def test_check_refuses_a_chain_that_matches_nothing() -> None:
    check = DaneHook.check(DaneRequirement("mx.d.test", (GOOD,), ("mx.d.test",)), [b"junk"])
    assert (check.ok, check.result) == (False, "dane-mismatch")
    assert "no TLSA record of mx.d.test matched the certificate" in check.reason
