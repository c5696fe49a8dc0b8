"""[tls] acme and its keys: defaults, the errors that name the key, reload classification."""

from __future__ import annotations

import pytest

from postillon.config.changes import restart_needed
from postillon.config.loader import ConfigError, parse_config
from postillon.config.tls import LETS_ENCRYPT_DIRECTORY

BASE = {"hostname": "mx.example.org", "domain": [{"name": "example.org"}]}


def test_defaults_off_and_lets_encrypt() -> None:
    config = parse_config(BASE)
    assert config.tls.acme is False
    assert config.tls.acme_directory == LETS_ENCRYPT_DIRECTORY


def test_acme_with_tls_alpn_listener() -> None:
    config = parse_config(
        {
            **BASE,
            "tls": {"acme": True, "acme_email": "hostmaster@example.org"},
            "mta_sts": {"listen": "0.0.0.0:443"},
        }
    )
    assert config.tls.acme and config.tls.acme_email == "hostmaster@example.org"


def test_acme_needs_a_challenge_listener() -> None:
    with pytest.raises(ConfigError, match="challenge listener"):
        parse_config({**BASE, "tls": {"acme": True}})
    parse_config({**BASE, "tls": {"acme": True, "acme_http_listen": "0.0.0.0:80"}})


def test_acme_needs_a_public_hostname() -> None:
    with pytest.raises(ConfigError, match="public DNS name"):
        parse_config({"tls": {"acme": True, "acme_http_listen": "0.0.0.0:80"}})


@pytest.mark.parametrize(
    ("tls", "key", "message"),
    [
        ({"acme_directory": "http://ca.example/dir"}, "tls.acme_directory", "https://"),
        ({"acme_email": "nobody"}, "tls.acme_email", "not an email"),
        ({"acme_http_listen": "80"}, "tls.acme_http_listen", ""),
        ({"acme_renew_before": 0}, "tls.acme_renew_before", ""),
        (
            {"acme": True, "certificate": "c.pem", "private_key": "k.pem"},
            "tls",
            "choose one",
        ),
    ],
)
def test_errors_name_the_key(tls: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "tls": {"acme_http_listen": "0.0.0.0:80", **tls}})
    assert f": {key}:" in str(info.value) and message in str(info.value)


def test_account_settings_need_a_restart() -> None:
    old = parse_config({**BASE, "tls": {"acme": True, "acme_http_listen": "0.0.0.0:80"}})
    new = parse_config(
        {
            **BASE,
            "tls": {
                "acme": True,
                "acme_http_listen": "0.0.0.0:8080",
                "acme_email": "a@example.org",
                "acme_renew_before": 86400,
            },
        }
    )
    assert sorted(restart_needed(old, new)) == ["tls.acme_email", "tls.acme_http_listen"]
