"""dns check's verdicts, record by record, against zones on the loopback DNS fixture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from postillon.dns.dnspython_resolver import DnsResolver
from postillon.dnsrecords.check import check_plan
from postillon.dnsrecords.records import plan_for
from postillon.signing.keys import DkimKey, write_new_key
from postillon.testing.dns_server import DnsServer

HOST = "mx.example.org"


@pytest.fixture
def key(tmp_path: Path) -> DkimKey:
    return write_new_key(tmp_path, "example.org", "s1", "ed25519")


async def _verdicts(zone: dict[str, Any], key: DkimKey) -> dict[str, tuple[str, str]]:
    with DnsServer({"example.org": zone}) as server:
        resolver = DnsResolver([server.nameserver], timeout=0.5, attempts=1)
        items = await check_plan(plan_for("example.org", HOST, (key,)), (key,), resolver)
    return {item.title: (item.status, item.detail) for item in items}


def _zone(key: DkimKey, **apex_txt: Any) -> dict[str, Any]:
    return {
        "@": {"MX": f"10 {HOST}", "TXT": apex_txt.get("spf", '"v=spf1 mx -all"')},
        HOST: {"A": "192.0.2.25", "TXT": '"v=spf1 a -all"'},
        key.dns_name: {"TXT": f'"{apex_txt.get("dkim", key.txt_value())}"'},
        "_dmarc.example.org": {"TXT": apex_txt.get("dmarc", '"v=DMARC1; p=reject"')},
        "_mta-sts.example.org": {"TXT": '"v=STSv1; id=20261128"'},
        "_smtp._tls.example.org": {
            "TXT": apex_txt.get("tlsrpt", '"v=TLSRPTv1; rua=mailto:tls@example.org"')
        },
    }


async def test_everything_fine(key: DkimKey) -> None:
    verdicts = await _verdicts(_zone(key), key)
    assert {t: v[0] for t, v in verdicts.items() if t != "Reverse DNS"} == {
        "MX": "ok",
        "Mail host address": "ok",
        "SPF": "ok",
        "SPF for HELO name": "ok",
        "DKIM s1 (ed25519)": "ok",
        "DMARC": "ok",
        "MTA-STS": "ok",
        # The record announces a policy, but mta-sts.example.org does not exist.
        "MTA-STS policy": "fail",
        "TLS-RPT": "ok",
    }
    assert verdicts["Reverse DNS"][0] == "warn"  # no PTR zone served
    assert "mta-sts.example.org has no A or AAAA record" in verdicts["MTA-STS policy"][1]


@pytest.mark.parametrize(
    ("change", "title", "status", "detail"),
    [
        ({"spf": '"v=spf1 +all"'}, "SPF", "fail", "lets anyone send"),
        ({"spf": '"v=spf1 -all"'}, "SPF", "warn", "names no sending host"),
        ({"spf": '"v=spf1 include:_spf.provider.example -all"'}, "SPF", "ok", "include:"),
        ({"dkim": "v=DKIM1; k=ed25519; p="}, "DKIM s1 (ed25519)", "fail", "revoked"),
        ({"dmarc": '"v=DMARC1; p=maybe"'}, "DMARC", "fail", "p= must be"),
        ({"dmarc": '"v=DMARC1; p=none"'}, "DMARC", "ok", "reports only"),
        ({"tlsrpt": '"v=TLSRPTv1; rua=ftp://x"'}, "TLS-RPT", "fail", "mailto: or https:"),
    ],
)
async def test_one_thing_wrong(
    key: DkimKey, change: dict[str, str], title: str, status: str, detail: str
) -> None:
    verdict = (await _verdicts(_zone(key, **change), key))[title]
    assert verdict[0] == status and detail in verdict[1], verdict


async def test_dkim_algorithm_mismatch(key: DkimKey, tmp_path: Path) -> None:
    zone = _zone(key, dkim=key.txt_value().replace("k=ed25519", "k=rsa"))
    status, detail = (await _verdicts(zone, key))["DKIM s1 (ed25519)"]
    assert status == "fail" and "expected ed25519" in detail


def test_records_text_quotes_and_notes(key: DkimKey) -> None:
    plan = plan_for("Example.ORG.", HOST, (key,), smarthost="smtp://relay.example:587")
    text = plan.zone_text(ttl=600)
    assert "example.org. 600 IN MX 10 mx.example.org." in text
    assert "smarthost" in text  # SPF note: include the smarthost's SPF
    assert f'{key.dns_name}. 600 IN TXT "{key.txt_value()}"' in text
    assert "mx: mx.example.org" in text  # the MTA-STS policy file, as a comment
    assert not plan.dkim_missing
    assert plan_for("example.org", "example.org", ()).dkim_missing
