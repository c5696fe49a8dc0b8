"""``postillon import-postfix`` (issue 17, item 5) against real Postfix configurations.

    PostfixInstance (a running Postfix, tests/support/postfix.py) ─┐
    hand-written main.cf/master.cf + postmap'd hash: tables ──────┼─▶ import-postfix ─▶ TOML
                                                                   │                     │
    postmap -q KEY TABLE (Postfix's own answer) ◀── compared ──────┘     check-config ◀──┘

Every table the importer read is compared, key by key, with what ``postmap -q`` answers
for it; the printed config must pass ``postillon check-config``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from postillon.postfiximport.tables import read_table
from support.postfix import smtp_route

if TYPE_CHECKING:
    from support.postfix_fixtures import MakePostfix

pytestmark = pytest.mark.integration

POSTILLON = [sys.executable, "-m", "postillon.cli.main"]


def import_postfix(directory: Path) -> str:
    result = subprocess.run(
        [*POSTILLON, "import-postfix", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "postillon.toml"
    path.write_text(text)
    result = subprocess.run(
        [*POSTILLON, "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr + "\n" + text
    return result.stdout


def postmap_q(key: str, spec: str, config_dir: Path) -> str | None:
    """Postfix's own answer for ``key`` in ``spec`` (None: not found)."""
    result = subprocess.run(
        ["postmap", "-c", str(config_dir), "-q", key, spec],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode == 1:
        return None
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def assert_same_as_postmap(spec: str, config_dir: Path) -> dict[str, str]:
    table = read_table(spec)
    assert table.entries
    for key, value in table.entries.items():
        assert postmap_q(key, spec, config_dir) == value, (spec, key)
    return table.entries


def test_a_running_postfix_config_is_translated(make_postfix: MakePostfix, tmp_path: Path) -> None:
    postfix = make_postfix(
        domain="pf.test",
        mailboxes=("user", "sender", "postmaster"),
        port=2625,
        transports={"example.org": smtp_route("127.0.0.1", 2525)},
        recipient_access={"defer@pf.test": "450 4.2.0 Try later"},
    )
    etc = postfix.config_directory
    text = import_postfix(etc)
    check_config(tmp_path, text)
    config = tomllib.loads(text)

    assert config["hostname"] == "postfix.pf.test"
    assert config["listen"] == [{"kind": "smtp", "address": "127.0.0.4:2625"}]
    (domain,) = config["domain"]
    assert domain["name"] == "pf.test"
    assert sorted(domain["mailboxes"]) == ["postmaster", "sender", "user"]
    assert config["relay"]["trusted_networks"] == ["127.0.0.0/8"]
    assert config["tls"]["certificate"].endswith("selfsigned-cert.pem")
    assert config["outbound"]["tls"] == "opportunistic"
    assert config["queue"]["first_retry"] == 1.0
    assert {"domain": "example.org", "route": "smtp:[127.0.0.1]:2525"} in config["transport"]
    assert config["transport"][-1]["domain"] == "*"  # the catch-all route comes last
    assert config["transport"][-1]["route"].startswith("error:5.4.4 ")
    # The texthash tables, key by key, as Postfix itself answers.
    transport = assert_same_as_postmap(f"texthash:{etc / 'transport'}", etc)
    assert transport["example.org"] == "smtp:[127.0.0.1]:2525"
    assert_same_as_postmap(f"texthash:{etc / 'virtual_mailboxes'}", etc)
    # Not translated, with the reason.
    assert re.search(
        r"^#\s+smtpd_recipient_restrictions = check_recipient_access .*\n"
        r"#\s+-> Postfix restriction lists have no one-to-one equivalent",
        text,
        re.M,
    )
    assert re.search(r"^#\s+virtual_uid_maps = static:\d+\n#\s+-> postillon writes", text, re.M)


MAIN_CF = """\
# A Debian-style main.cf with virtual domains and a relay with a password.
smtpd_banner = $myhostname ESMTP $mail_name (Debian/GNU)
biff = no
compatibility_level = 3.6
myhostname = mx.example.org
mydomain = example.org
myorigin = $mydomain
mydestination = $myhostname, $mydomain, localhost.$mydomain, localhost
alias_maps = hash:{d}/aliases
alias_database = hash:{d}/aliases
relayhost = [smtp.provider.test]:587
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = hash:{d}/sasl_passwd
smtp_tls_security_level = encrypt
mynetworks = 127.0.0.0/8 [::1]/128
    192.0.2.0/24
recipient_delimiter = +-
message_size_limit = 20480000
maximal_queue_lifetime = 3d
virtual_mailbox_domains = example.net
virtual_mailbox_maps = hash:{d}/vmailbox
virtual_alias_maps = texthash:{d}/virtual
transport_maps = hash:{d}/transport
smtpd_tls_cert_file = {d}/cert.pem
smtpd_milters = inet:127.0.0.1:8891
home_mailbox = Maildir/
"""
MASTER_CF = """\
smtp      inet  n       -       y       -       -       smtpd
#smtps    inet  n       -       y       -       -       smtpd
submission inet n       -       y       -       -       smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_proxy_filter=127.0.0.1:10025
127.0.0.1:10026 inet n  -       n       -       -       smtpd
  -o smtpd_tls_wrappermode=yes
pickup    unix  n       -       y       60      1       pickup
cleanup   unix  n       -       y       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
smtp      unix  -       -       y       -       -       smtp
spamfilter unix -       n       n       -       -       pipe
  flags=Rq user=spamd argv=/usr/bin/spamfilter.sh -oi -f ${{sender}} ${{recipient}}
"""


@pytest.fixture
def handwritten(tmp_path: Path) -> Path:
    d = tmp_path / "postfix"
    d.mkdir()
    (d / "main.cf").write_text(MAIN_CF.format(d=d))
    (d / "master.cf").write_text(MASTER_CF.format())
    (d / "aliases").write_text("postmaster: root\nroot: alice\nabuse: alice, bob@remote.test\n")
    (d / "sasl_passwd").write_text("[smtp.provider.test]:587 relayuser@example.org:p@ss#w/rd\n")
    (d / "vmailbox").write_text(
        "carol@example.net  example.net/carol/\n"
        "dave@example.net   example.net/dave/\n"
        "@example.net       example.net/catchall/\n"
    )
    (d / "virtual").write_text(
        "# aliases of the virtual domain\n"
        "info@example.net   carol@example.net,\n"
        "                   dave@example.net\n"
        "sales@example.org  alice\n"
        "@example.com       carol@example.net\n"
    )
    (d / "transport").write_text(
        "partner.test      smtp:[198.51.100.7]:2525\n"
        "lmtp.test         lmtp:inet:127.0.0.1:24\n"
        ".sub.example.org  relay:[relay.example.org]\n"
        "old.test          error:5.1.1 this domain is gone\n"
        "nowhere.test      retry:maintenance\n"
    )
    (d / "cert.pem").write_text("")
    empty = tmp_path / "postmap-config"
    empty.mkdir()
    (empty / "main.cf").write_text("")
    for table in ("sasl_passwd", "vmailbox", "transport"):
        subprocess.run(["postmap", "-c", str(empty), f"hash:{d / table}"], check=True)
    subprocess.run(["postalias", "-c", str(empty), f"hash:{d / 'aliases'}"], check=True)
    return d


def test_a_handwritten_config_with_hash_and_texthash_maps(
    handwritten: Path, tmp_path: Path
) -> None:
    d = handwritten
    empty = tmp_path / "postmap-config"
    # The indexed file is what Postfix uses: the importer reads it (postmap -s) even when
    # the text beside it is gone or out of date.
    (d / "vmailbox").unlink()
    (d / "transport").write_text("stale.test smtp:[192.0.2.9]\n")  # postmap was not re-run

    text = import_postfix(d)
    check_config(tmp_path, text)
    config: dict[str, Any] = tomllib.loads(text)

    assert config["hostname"] == "mx.example.org"
    assert config["listen"] == [
        {"kind": "smtp", "address": "0.0.0.0:25"},
        {"kind": "submission", "address": "0.0.0.0:587"},
        {"kind": "submissions", "address": "127.0.0.1:10026"},
    ]
    relay = config["relay"]
    assert relay["trusted_networks"] == ["127.0.0.0/8", "::1/128", "192.0.2.0/24"]
    assert relay["smarthost"] == (
        "smtp://relayuser%40example.org:p%40ss%23w%2Frd@smtp.provider.test:587"
    )
    assert config["outbound"]["tls"] == "encrypt"
    assert config["tls"] == {"certificate": str(d / "cert.pem"), "private_key": str(d / "cert.pem")}
    assert config["limits"]["message_size"] == 20480000
    assert config["queue"]["lifetime"] == 3 * 86400.0
    assert config["aliases"]["recipient_delimiter"] == "+-"
    assert config["aliases"]["files"] == [str(d / "aliases")]

    domains = {entry["name"]: entry for entry in config["domain"]}
    assert set(domains) == {"example.net", "example.org", "mx.example.org"}
    net = domains["example.net"]
    assert sorted(net["mailboxes"]) == ["carol", "catchall", "dave"]
    assert net["catch_all"] == "catchall"
    assert net["aliases"] == {"info": ["carol@example.net", "dave@example.net"]}
    assert domains["example.org"]["aliases"] == {"sales": ["alice"]}
    assert "alice" in domains["example.org"]["mailboxes"]  # a system user aliases name

    routes = {rule["domain"]: rule["route"] for rule in config["transport"]}
    assert routes == {
        "partner.test": "smtp:[198.51.100.7]:2525",
        "lmtp.test": "lmtp:127.0.0.1:24",
        "old.test": "error:5.1.1 this domain is gone",
        "nowhere.test": "error:4.3.0 maintenance",
    }
    # What the importer read is what Postfix answers, key by key.
    for spec in (f"hash:{d / 'vmailbox'}", f"hash:{d / 'transport'}", f"texthash:{d / 'virtual'}"):
        assert_same_as_postmap(spec, empty)
    assert "stale.test" not in text

    # Not translated, each with a reason.
    for setting, reason in (
        ("virtual_alias_maps @example.com carol@example.net", "a whole-domain forward"),
        (".sub.example.org relay:[relay.example.org]", "postillon routes whole domains"),
        ("smtpd_milters = inet:127.0.0.1:8891", "milters are not configured"),
        ("home_mailbox = Maildir/", "local(8) delivery"),
        ("master.cf submission -o smtpd_proxy_filter=127.0.0.1:10025", "no equivalent"),
        ("spamfilter unix pipe", "a service of its own"),
    ):
        assert re.search(
            rf"^#\s+.*{re.escape(setting)}.*\n#\s+-> .*{re.escape(reason)}", text, re.M
        ), setting
    # Nothing of Postfix's own machinery is listed.
    assert "compatibility_level" not in text
    assert "biff" not in text


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*POSTILLON, "import-postfix", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "main.cf: No such file or directory" in result.stderr
