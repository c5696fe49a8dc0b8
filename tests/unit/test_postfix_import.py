"""The Postfix file parsers behind ``postillon import-postfix`` (postfiximport/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from postillon.postfiximport.postconf import parse_main_cf, parse_master_cf
from postillon.postfiximport.tables import TableError, parse_postmap_text, read_table


def test_main_cf_expands_references_and_joins_continuations() -> None:
    main = parse_main_cf(
        "myhostname = mx.example.org\n"
        "# a comment\n"
        "mydestination = $myhostname, ${mydomain},\n"
        "    localhost.$(mydomain)\n"
        "relayhost = [smtp.example.net]:587\n"
        "relayhost = [smtp.example.com]\n",  # the last one counts
        hostname="fallback.test",
    )
    assert main.list("mydestination") == ["mx.example.org", "example.org", "localhost.example.org"]
    assert main.get("relayhost") == "[smtp.example.com]"
    assert main.get("message_size_limit") == "10240000"  # Postfix's default
    assert not main.is_set("message_size_limit")


def test_main_cf_without_myhostname_uses_the_machine_name() -> None:
    main = parse_main_cf("mydestination = $myhostname\n", hostname="box.example.org")
    assert main.get("mydestination") == "box.example.org"
    assert main.get("mydomain") == "example.org"


def test_main_cf_reference_loop_does_not_hang() -> None:
    main = parse_main_cf("a = $b\nb = $a\n", hostname="h")
    assert "$" in main.get("a")


def test_master_cf_services_and_options() -> None:
    services = parse_master_cf(
        "smtp inet n - y - - smtpd\n"
        "#submission inet n - y - - smtpd\n"
        "submission inet n - y - - smtpd\n"
        "  -o smtpd_sasl_auth_enable=yes\n"
        "  -o smtpd_tls_security_level=encrypt\n"
        "broken line\n"
    )
    assert [(s.name, s.command) for s in services] == [("smtp", "smtpd"), ("submission", "smtpd")]
    assert services[1].options == {
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_tls_security_level": "encrypt",
    }


def test_postmap_text_rules() -> None:
    text = "# c\nKey@Example.org  a,\n   b\n\nkey@example.org second\nalone\n"
    assert parse_postmap_text(text) == {"key@example.org": "a, b", "alone": ""}
    assert parse_postmap_text("root: alice,\n  bob\n", aliases=True) == {"root": "alice, bob"}


def test_tables_that_are_not_lists_of_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="pcre: table is not a list of keys"):
        read_table("pcre:/etc/postfix/x.pcre")
    with pytest.raises(TableError, match="cannot read"):
        read_table(f"texthash:{tmp_path / 'missing'}")
    (tmp_path / "t").write_text("a b\n")
    assert read_table(f"proxy:texthash:{tmp_path / 't'}").entries == {"a": "b"}
