"""Our own MTA-STS policy (RFC 8461 §3.2): the config, the one function that writes the
policy text (read back by our own parser), the TXT id that follows it, the records
``dns records`` prints for the policy host, and the request → domain rule of the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postillon.config.changes import effective, restart_needed
from postillon.config.loader import ConfigError, parse_config
from postillon.config.model import Config
from postillon.core.sts import (
    MAX_AGE_LIMIT,
    PolicyError,
    StsPolicy,
    format_policy,
    parse_policy,
)
from postillon.dnsrecords.records import mta_sts_id, plan_for, served_policy
from postillon.dnsrecords.sts_server import policy_host, uncovered_names
from support.https_server import make_tls_files

HOST = "mx.example.org"


def test_the_exact_text_with_crlf() -> None:
    """RFC 8461 §3.2's example, field for field: version first, CRLF line ends."""
    text = format_policy(StsPolicy("enforce", 86400, ("mail.example.com", "*.example.net")))
    assert text == (
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
        "max_age: 86400\r\n"
    )


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_NAME = st.builds(
    lambda labels, wild: ("*." if wild else "") + ".".join(labels),
    st.lists(_LABEL, min_size=2, max_size=4),
    st.booleans(),
)


@given(
    mode=st.sampled_from(["enforce", "testing", "none"]),
    max_age=st.integers(0, MAX_AGE_LIMIT),
    mx=st.lists(_NAME, min_size=1, max_size=5),
)
def test_our_output_parses_back_unchanged(mode: Any, max_age: int, mx: list[str]) -> None:
    policy = StsPolicy(mode, max_age, tuple(mx))
    assert parse_policy(format_policy(policy)) == policy


def test_mode_none_may_list_no_mx() -> None:
    policy = StsPolicy("none", 0, ())
    assert parse_policy(format_policy(policy)) == policy


@pytest.mark.parametrize(
    "policy",
    [
        StsPolicy("enforce", 86400, ()),
        StsPolicy("testing", MAX_AGE_LIMIT + 1, (HOST,)),
        StsPolicy("testing", -1, (HOST,)),
        StsPolicy("testing", 86400, ("mx.example.org\r\nmode: none",)),
        StsPolicy("sometimes", 86400, (HOST,)),  # type: ignore[arg-type]
    ],
)
def test_a_policy_the_parser_would_refuse_is_never_written(policy: StsPolicy) -> None:
    with pytest.raises(PolicyError):
        format_policy(policy)


def _config(**mta_sts: Any) -> Config:
    return parse_config({"hostname": HOST, "mta_sts": mta_sts})


def test_defaults_testing_a_week_and_the_hostname() -> None:
    config = parse_config({"hostname": "MX.Example.ORG."})
    assert config.mta_sts.listen is None
    assert served_policy(config) == StsPolicy("testing", 604800, ("mx.example.org",))
    listed = _config(mx=["MX1.example.org.", "*.Example.NET"], mode="enforce")
    assert served_policy(listed) == StsPolicy(
        "enforce", 604800, ("mx1.example.org", "*.example.net")
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"max_age": MAX_AGE_LIMIT + 1}, "mta_sts.max_age: 31557601 is not 0 to 31557600 seconds"),
        ({"max_age": -5}, "mta_sts.max_age: -5 is not 0 to 31557600"),
        ({"mode": "always"}, "mta_sts.mode:"),
        ({"mx": ["mx.example.org", "two words"]}, "mta_sts.mx: 'two words' is not a host name"),
        ({"mx": ["a.*.example.org"]}, "mta_sts.mx: 'a.*.example.org' is not a host name"),
        ({"mx": []}, "mta_sts.mx is empty: mode testing needs at least one MX pattern"),
        ({"listen": "443"}, "mta_sts.listen: '443' must be host:port"),
        ({"listne": "0.0.0.0:443"}, "mta_sts.listne: unknown key"),
    ],
)
def test_bad_settings_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(**section)
    assert message in str(caught.value)


def test_serving_needs_a_certificate() -> None:
    with pytest.raises(ConfigError, match=r"mta_sts\.listen is set but the server has no cert"):
        parse_config({"mta_sts": {"listen": "0.0.0.0:443"}, "tls": {"self_signed": False}})
    assert _config(listen="0.0.0.0:443").mta_sts.listen == "0.0.0.0:443"  # self-signed


def test_reload_applies_the_policy_not_the_socket() -> None:
    old = _config(listen="0.0.0.0:443")
    new = _config(listen="127.0.0.1:8443", mode="enforce", max_age=86400, mx=["mx2.example.org"])
    assert restart_needed(old, new) == ["mta_sts.listen"]
    applied = effective(old, new).mta_sts
    assert applied.listen == "0.0.0.0:443"
    assert (applied.mode, applied.max_age, applied.mx) == ("enforce", 86400, ("mx2.example.org",))


def _published_id(config: Config) -> str:
    plan = plan_for(
        "example.org",
        config.hostname,
        (),
        sts_policy=served_policy(config),
        sts_listen=config.mta_sts.listen,
    )
    (record,) = [r for r in plan.records if r.kind == "MTA-STS"]
    assert record.value.startswith("v=STSv1; id=")
    return record.value.removeprefix("v=STSv1; id=")


def test_the_id_changes_exactly_when_the_policy_does() -> None:
    base = _published_id(_config(listen="0.0.0.0:443"))
    # RFC 8461 §3.1: 1 to 32 letters and digits.
    assert base.isalnum() and base.isascii() and 1 <= len(base) <= 32
    assert base == mta_sts_id(format_policy(StsPolicy("testing", 604800, (HOST,))))
    # Nothing the policy does not contain moves it: where it is served, other sections.
    assert _published_id(_config()) == base
    assert _published_id(_config(listen="192.0.2.1:443", mx=[HOST.upper()])) == base
    unrelated = parse_config({"hostname": HOST, "limits": {"recipients": 500}})
    assert _published_id(unrelated) == base
    changed = {
        _published_id(_config(mode="enforce")),
        _published_id(_config(mode="none")),
        _published_id(_config(max_age=86400)),
        _published_id(_config(mx=[HOST, "mx2.example.org"])),
        _published_id(_config(mx=["*.example.org"])),
        _published_id(parse_config({"hostname": "mx2.example.org"})),  # the default mx
    }
    assert base not in changed and len(changed) == 6


@pytest.mark.parametrize(
    ("listen", "line"),
    [
        ("192.0.2.25:443", "mta-sts.example.org. 3600 IN A 192.0.2.25"),
        ("[2001:db8::25]:443", "mta-sts.example.org. 3600 IN AAAA 2001:db8::25"),
        ("0.0.0.0:443", f"mta-sts.example.org. 3600 IN CNAME {HOST}."),
        ("[::]:443", f"mta-sts.example.org. 3600 IN CNAME {HOST}."),
    ],
)
def test_records_name_the_policy_host(listen: str, line: str) -> None:
    config = _config(listen=listen)
    plan = plan_for("example.org", HOST, (), sts_policy=served_policy(config), sts_listen=listen)
    text = plan.zone_text()
    assert line in text.splitlines(), text
    assert "postillon serves https://mta-sts.example.org/.well-known/mta-sts.txt" in text
    assert "must also name mta-sts.example.org" in text
    assert "a web server with a valid certificate" not in text


def test_records_with_acme_say_the_certificate_names_the_policy_host() -> None:
    # [tls] acme orders mta-sts.DOMAIN with the hostname: nothing for the operator to add.
    text = plan_for("example.org", HOST, (), sts_listen="0.0.0.0:443", acme=True).zone_text()
    assert "The ACME certificate ([tls] acme) names mta-sts.example.org" in text
    assert "must also name" not in text


def test_records_without_the_server_ask_for_a_web_server() -> None:
    text = plan_for("example.org", HOST, ()).zone_text()
    assert not any(line.startswith("mta-sts.example.org.") for line in text.splitlines())
    assert "(a web server with a valid certificate for mta-sts.example.org) holding:" in text
    assert ";   mode: testing" in text.splitlines()
    assert "Senders connect to port 443" not in text


def test_records_for_another_port_say_to_forward_443() -> None:
    plan = plan_for("example.org", HOST, (), sts_listen="192.0.2.25:8443")
    assert "Senders connect to port 443: forward it to port 8443." in plan.zone_text()


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("mta-sts.example.org", "example.org"),
        ("MTA-STS.Example.ORG", "example.org"),
        ("mta-sts.example.org.", "example.org"),
        ("mta-sts.example.org:443", "example.org"),
        ("mta-sts.other.example", "other.example"),
        ("example.org", None),
        ("www.example.org", None),
        ("mta-sts.unknown.example", None),
        ("mta-sts.sub.example.org", None),
        ("x.mta-sts.example.org", None),
        ("[2001:db8::1]:443", None),
        ("127.0.0.1", None),
        ("", None),
    ],
)
def test_host_selects_the_domain(host: str, domain: str | None) -> None:
    assert policy_host(host, {"example.org", "other.example"}) == domain


def test_uncovered_names(tmp_path: Path) -> None:
    _, cert, _ = make_tls_files(tmp_path, [HOST, "mta-sts.example.org", "*.example.net"])
    wanted = ["mta-sts.example.org", "mta-sts.example.net", "mta-sts.other.example"]
    assert uncovered_names(cert, wanted) == ["mta-sts.other.example"]
    assert uncovered_names(tmp_path / "missing.pem", wanted) == wanted
