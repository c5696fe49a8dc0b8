"""DaneHook's lookup table (RFC 7672 §2.2) against a fake resolver: one row per DNS state."""

from __future__ import annotations

import pytest

from postillon.dns.resolver import Answer, DnsBogus, DnsNotFound, DnsTempError, TlsaRecord
from postillon.outbound.dane_policy import DaneHook
from postillon.outbound.tls_policy import HostRefused, NoPublishedPolicy, TlsRequirement

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
NOT_FOUND = DnsNotFound(NAME, "TLSA", "no", nxdomain=False, authenticated=True)
SOURCE = f"dane {NAME}"


def none(why: str) -> NoPublishedPolicy:
    return NoPublishedPolicy(why + " is not DNSSEC-secure")


def dane(*records: TlsaRecord) -> TlsRequirement:
    return TlsRequirement("dane", match=("mx.d.test",), tlsa=records, source=SOURCE)


@pytest.mark.parametrize(
    ("mx", "addr", "result", "expected"),
    [
        # insecure MX or address answers: DANE does not apply, no TLSA lookup (§2.2)
        (False, True, answer(GOOD), none("the MX answer for mx.d.test")),
        (True, False, answer(GOOD), none("the address answer for mx.d.test")),
        (True, True, answer(GOOD, secure=False), none(f"the TLSA answer at {NAME}")),
        (True, True, NOT_FOUND, NoPublishedPolicy(f"no TLSA records at {NAME}")),
        (True, True, answer(GOOD, PKIX), dane(GOOD)),  # PKIX-EE is unusable for SMTP (§3.1.3)
        (True, True, answer(PKIX), dane()),  # secure, none usable: mandatory unauthenticated TLS
        (True, True, DnsBogus(NAME, "TLSA", "SERVFAIL"), "dnssec-bogus"),
        (True, True, DnsTempError(NAME, "TLSA", "timeout"), "dane-lookup-failed"),
        (True, True, RuntimeError("surprise"), "dane-lookup-failed"),
    ],
)  # fmt: skip
async def test_lookup(mx: bool, addr: bool, result: object, expected: object) -> None:
    resolver = FakeResolver(result)  # type: ignore[arg-type]
    got = await DaneHook(resolver).lookup(  # type: ignore[arg-type]
        "mx.d.test", mx_secure=mx, address_secure=addr
    )
    if isinstance(expected, str):
        assert isinstance(got, HostRefused) and got.result == expected and got.mode == "dane"
        assert got.reason.startswith(f"DANE: TLSA lookup of {NAME} failed")
    else:
        assert got == expected
    assert resolver.asked == ([NAME] if mx and addr else [])


async def test_port_names_the_tlsa_owner() -> None:
    resolver = FakeResolver(answer(GOOD))
    got = await DaneHook(resolver).lookup(  # type: ignore[arg-type]
        "MX.d.test.", 2525, mx_secure=True, address_secure=True
    )
    assert resolver.asked == ["_2525._tcp.MX.d.test"]
    assert isinstance(got, TlsRequirement) and got.match == ("mx.d.test",)
    assert got.authenticated and got.starttls == "required"


class ByName:
    """TLSA answers by owner name (absent: a secure NXDOMAIN)."""

    def __init__(self, answers: dict[str, Answer[TlsaRecord] | Exception]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def tlsa(self, name: str) -> Answer[TlsaRecord]:
        self.asked.append(name)
        missing = DnsNotFound(name, "TLSA", "no", nxdomain=True, authenticated=True)
        found = self.answers.get(name, missing)
        if isinstance(found, Exception):
            raise found
        return found


REAL = "_25._tcp.real.d.test"


async def _alias_lookup(resolver: ByName, **kw: object) -> object:
    return await DaneHook(resolver).lookup(  # type: ignore[arg-type]
        "mx.d.test", mx_secure=True, address_secure=True, canonical="Real.D.test.", **kw
    )


async def test_cname_expanded_name_first_with_both_reference_names() -> None:
    """RFC 7672 §2.2.2: a secure CNAME chain: TLSA at the expanded name first."""
    resolver = ByName({REAL: answer(GOOD), NAME: answer(PKIX)})
    got = await _alias_lookup(resolver)
    assert resolver.asked == [REAL]
    assert got == TlsRequirement(
        "dane", match=("real.d.test", "mx.d.test"), tlsa=(GOOD,), source=f"dane {REAL}"
    )


async def test_cname_without_tlsa_at_the_expanded_name_uses_the_original() -> None:
    resolver = ByName({NAME: answer(GOOD)})
    got = await _alias_lookup(resolver)
    assert resolver.asked == [REAL, NAME]
    assert isinstance(got, TlsRequirement) and got.tlsa == (GOOD,)
    assert got.match == ("real.d.test", "mx.d.test") and got.source == SOURCE
    # Insecure at the expanded name: also the original.
    resolver = ByName({REAL: answer(GOOD, secure=False), NAME: answer(GOOD)})
    got = await _alias_lookup(resolver)
    assert resolver.asked == [REAL, NAME] and isinstance(got, TlsRequirement)


async def test_cname_with_no_tlsa_anywhere_says_both() -> None:
    resolver = ByName({})
    got = await _alias_lookup(resolver)
    assert isinstance(got, NoPublishedPolicy)
    assert REAL in got.reason and NAME in got.reason


async def test_cname_bogus_at_the_expanded_name_refuses_the_host() -> None:
    resolver = ByName({REAL: DnsBogus(REAL, "TLSA", "SERVFAIL"), NAME: answer(GOOD)})
    got = await _alias_lookup(resolver)
    assert isinstance(got, HostRefused) and got.result == "dnssec-bogus"
    assert resolver.asked == [REAL]  # a bogus answer is not "no records": no fallback


async def test_insecure_address_answer_means_no_expansion_and_no_dane() -> None:
    resolver = ByName({REAL: answer(GOOD)})
    got = await DaneHook(resolver).lookup(  # type: ignore[arg-type]
        "mx.d.test", mx_secure=True, address_secure=False, canonical="real.d.test"
    )
    assert isinstance(got, NoPublishedPolicy) and resolver.asked == []


async def test_canonical_equal_to_the_host_is_no_alias() -> None:
    resolver = ByName({NAME: answer(GOOD)})
    got = await DaneHook(resolver).lookup(  # type: ignore[arg-type]
        "mx.d.test", mx_secure=True, address_secure=True, canonical="MX.d.test"
    )
    assert resolver.asked == [NAME] and isinstance(got, TlsRequirement)
    assert got.match == ("mx.d.test",)
