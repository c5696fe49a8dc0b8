"""The admin TLS views' data: per recipient from history events, per destination from
the TLS report counters and the MTA-STS cache; the TLS details the transport records."""

from __future__ import annotations

import asyncio

from postillon.admin.queue_ops import last_tls_by_recipient
from postillon.admin.tls_view import tls_domains
from postillon.core.outcome import TlsDetails
from postillon.core.sts import CachedPolicy, StsPolicy
from postillon.core.tlsrpt import TlsResultCount, utc_day
from postillon.outbound.session_tls import policy_label, tls_details
from postillon.outbound.session_types import SessionError
from postillon.outbound.tls_policy import HostRefused, TlsRequirement
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import QueueEvent

NOW = 1_780_000_000.0


def test_log_fields_are_flat_and_skip_missing_tls() -> None:
    details = TlsDetails("mx.example", "192.0.2.1", "dane", "dane-ee", True, "TLSv1.3", "X")
    assert details.log_fields() == {
        "mx": "mx.example",
        "tls_policy": "dane",
        "tls_result": "dane-ee",
        "tls_verified": "yes",
        "tls_version": "TLSv1.3",
        "tls_cipher": "X",
    }
    refused = TlsDetails("mx.example", "192.0.2.1", "mta-sts", "validation-failure", False)
    assert "tls_version" not in refused.log_fields()
    assert refused.log_fields()["tls_verified"] == "no"


def test_policy_labels() -> None:
    assert policy_label(TlsRequirement("dane", tlsa=())) == "dane"
    assert policy_label(TlsRequirement("verify", sts="enforce")) == "mta-sts"
    assert policy_label(TlsRequirement("opportunistic", sts="testing")) == "mta-sts-testing"
    assert policy_label(TlsRequirement("verify")) == "verify"
    assert policy_label(HostRefused("r", "dnssec-bogus")) == "dane"
    sts_refusal = HostRefused("r", "validation-failure", "verify", sts_policy="mode: enforce")
    assert policy_label(sts_refusal) == "mta-sts"


def test_details_of_a_connection_that_failed_its_tls_policy() -> None:
    error = SessionError(
        "no matching name", tls_result="not-verified", tls="TLSv1.3 TLS_AES_128_GCM_SHA256"
    )
    details = tls_details("mx.example", "192.0.2.1", None, TlsRequirement("verify"), error)
    assert details == TlsDetails(
        "mx.example", "192.0.2.1", "verify", "not-verified", False, "TLSv1.3",
        "TLS_AES_128_GCM_SHA256",
    )  # fmt: skip
    plain = SessionError("no STARTTLS", tls_result="starttls-not-supported")
    assert tls_details("h", "a", None, TlsRequirement("encrypt"), plain).result == (
        "starttls-not-supported"
    )
    refused = tls_details("h", "a", None, TlsRequirement("verify"), SessionError("refused"))
    assert refused.result == "no-connection" and not refused.verified


def test_last_tls_per_recipient_is_the_latest_attempt() -> None:
    def event(at: float, kind: str, to: str, result: str | None) -> QueueEvent:
        fields: dict[str, object] = {"to": to, "relay": "x"}
        if result:
            fields |= {"mx": "mx", "tls_policy": "verify", "tls_result": result}
            fields["tls_verified"] = "yes" if result == "verified" else "no"
        return QueueEvent("Q", at, kind, fields)

    events = [
        QueueEvent("Q", 1.0, "received", {"from": "a@b"}),
        event(2.0, "deferred", "a@x.test", "not-verified"),
        event(3.0, "delivered", "a@x.test", "verified"),
        event(4.0, "deferred", "b@x.test", "not-verified"),
        event(5.0, "delivered", "c@local", None),  # local delivery: no TLS
    ]
    found = last_tls_by_recipient(events)
    assert set(found) == {"a@x.test", "b@x.test"}
    assert found["a@x.test"]["result"] == "verified" and found["a@x.test"]["verified"] is True
    assert found["a@x.test"]["event"] == "delivered"
    assert found["b@x.test"]["verified"] is False


def test_tls_domains_join_counters_and_the_mta_sts_cache() -> None:
    async def run() -> None:
        store = MemoryStore(clock_now=lambda: NOW)
        today, yesterday = utc_day(NOW), utc_day(NOW - 86400)
        old = utc_day(NOW - 5 * 86400)
        await store.tls_reports.add(
            [
                TlsResultCount(today, "a.test", "sts", ("mode: enforce",), "success", count=3),
                TlsResultCount(
                    yesterday, "a.test", "sts", ("mode: enforce",), "validation-failure",
                    "mx9.a.test", "", "192.0.2.9", "", 2,
                ),
                TlsResultCount(today, "b.test", "no-policy-found", (), "success", count=1),
                TlsResultCount(old, "b.test", "no-policy-found", (), "success", count=50),
            ]
        )  # fmt: skip
        policy = StsPolicy("enforce", 86400, ("mx1.c.test",))
        await store.save_sts_policy(CachedPolicy("c.test", "id1", policy, NOW - 100, NOW - 50))
        days, domains = await tls_domains(store, NOW)
        assert days == [today, yesterday]
        assert [d["domain"] for d in domains] == ["a.test", "b.test", "c.test"]
        a = domains[0]
        assert (a["sessions"], a["successful"], a["failed"]) == (5, 3, 2)
        assert a["results"] == {"success": 3, "validation-failure": 2}
        assert a["failures"] == [
            {
                "result": "validation-failure",
                "mx_host": "mx9.a.test",
                "receiving_ip": "192.0.2.9",
                "reason": "",
                "count": 2,
            }
        ]
        assert domains[1]["sessions"] == 1  # the old day is outside the two days
        c = domains[2]
        assert c["sessions"] == 0 and c["mta_sts"]["mode"] == "enforce"
        assert c["mta_sts"]["fresh"] is True and c["mta_sts"]["mx"] == ["mx1.c.test"]
        _, one = await tls_domains(store, NOW, days=7, domain="B.TEST.")
        assert [d["domain"] for d in one] == ["b.test"] and one[0]["sessions"] == 51
        _, none = await tls_domains(store, NOW, domain="nowhere.test")
        assert none == []

    asyncio.run(run())
