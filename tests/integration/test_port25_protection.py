"""Protection at connect on port 25, against the real server and real clients.

    smtplib / raw socket (127.0.0.x) ──SMTP──▶ postillon serve (smtp listener)
                                                  │  [dnsbl] zones, [client_checks]
                                                  ▼
                                      loopback DNS server: DNSBL zones + PTR/A records

DNSBL/DNSWL weighted scores refuse a listed client at connect with a reply naming the
list; the reverse name of a client is forward-confirmed and written into Received:,
and a client without one is refused (reject_unknown_client = "reject"); a client that
talks before the greeting (greet_pause) is refused; HELO names are checked.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from postillon.testing.dns_server import DnsServer
from support.server import ServerProcess, default_config

ZONES = {
    "zen.example": {
        "2.0.0.127.zen.example": {"A": "127.0.0.2"},
        "4.0.0.127.zen.example": {"A": "127.0.0.4"},
        "7.0.0.127.zen.example": {"A": "127.0.0.1"},  # 127.0.0.1 is not a listing
    },
    "weak.example": {"3.0.0.127.weak.example": {"A": "127.0.0.2"}},
    "dnswl.example": {"4.0.0.127.dnswl.example": {"A": "127.0.10.1"}},
    "0.0.127.in-addr.arpa": {
        "2.0.0.127.in-addr.arpa": {"PTR": "host2.client.example"},
        "3.0.0.127.in-addr.arpa": {"PTR": "host3.client.example"},
        "4.0.0.127.in-addr.arpa": {"PTR": "host4.client.example"},
        "6.0.0.127.in-addr.arpa": {"PTR": "liar.client.example"},
        "7.0.0.127.in-addr.arpa": {"PTR": "host7.client.example"},
    },
    "client.example": {
        "host2.client.example": {"A": "127.0.0.2"},
        "host3.client.example": {"A": "127.0.0.3"},
        "host4.client.example": {"A": "127.0.0.4"},
        "liar.client.example": {"A": "192.0.2.99"},  # does not confirm 127.0.0.6
        "host7.client.example": {"A": "127.0.0.7"},
    },
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, dns: DnsServer) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("port25") / "srv"
    root.mkdir()
    config = default_config(
        root,
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        dnsbl={
            "zones": {"zen.example": 2, "weak.example": 1, "dnswl.example": -2},
            "threshold": 2,
        },
        client_checks={
            "greet_pause": 0.3,
            "reject_unknown_client": "reject",
            "helo_checks": True,
        },
    )
    proc = ServerProcess(root, config).start()
    yield proc
    proc.stop()


def address(server: ServerProcess) -> tuple[str, int]:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    return host, int(port)


def greeting(server: ServerProcess, source: str) -> tuple[int, str]:
    """Connect from ``source`` and return the greeting (code, text)."""
    host, port = address(server)
    client = smtplib.SMTP(timeout=10, source_address=(source, 0))
    try:
        code, text = client.connect(host, port)
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code, exc.smtp_error.decode()
    finally:
        client.close()
    return code, text.decode()


def test_a_client_listed_above_the_threshold_is_refused_naming_the_list(
    server: ServerProcess,
) -> None:
    code, text = greeting(server, "127.0.0.2")
    assert code == 554
    assert "5.7.1" in text and "blocked using zen.example" in text and "[127.0.0.2]" in text
    assert "dnsbl" in server.wait_for_log("check=dnsbl")


def test_a_client_below_the_threshold_passes_and_its_confirmed_name_is_in_received(
    server: ServerProcess,
) -> None:
    host, port = address(server)
    with smtplib.SMTP(host, port, timeout=10, source_address=("127.0.0.3", 0)) as client:
        client.ehlo("host3.client.example")
        client.sendmail(
            "someone@remote.example", ["alice@example.org"], b"Subject: weak\r\n\r\nhi\r\n"
        )
    path = server.wait_for_mail("alice@example.org")[-1]
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert "(host3.client.example [127.0.0.3])" in str(message["Received"])


def test_an_allow_list_cancels_a_block_list(server: ServerProcess) -> None:
    code, _ = greeting(server, "127.0.0.4")
    assert code == 220


def test_an_answer_outside_127_0_0_2_and_up_is_not_a_listing(server: ServerProcess) -> None:
    code, _ = greeting(server, "127.0.0.7")
    assert code == 220


@pytest.mark.parametrize("source", ["127.0.0.5", "127.0.0.6"])
def test_a_client_without_confirmed_reverse_dns_is_refused(
    server: ServerProcess, source: str
) -> None:
    code, text = greeting(server, source)
    assert code == 550 and "5.7.25" in text, text


def test_a_client_that_talks_before_the_greeting_is_refused(server: ServerProcess) -> None:
    host, port = address(server)
    with socket.create_connection((host, port), timeout=10, source_address=("127.0.0.3", 0)) as s:
        s.sendall(b"EHLO bot.example\r\nMAIL FROM:<spam@bot.example>\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"554 5.5.1"), reply
    assert b"220" not in reply  # never greeted, never answered EHLO


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("mx.test.example", 550),  # our own hostname
        ("[127.0.0.1]", 550),  # our own address (the listener's)
        ("localhost", 501),  # not fully qualified
        ("127.0.0.3", 501),  # a bare IP
        ("host3.client.example", 250),
        ("[127.0.0.3]", 250),
    ],
)
def test_helo_names_are_checked(server: ServerProcess, name: str, code: int) -> None:
    host, port = address(server)
    with smtplib.SMTP(host, port, timeout=10, source_address=("127.0.0.3", 0)) as client:
        assert client.ehlo(name)[0] == code


def test_settings_errors_name_the_key(tmp_path: Path) -> None:
    config = default_config(tmp_path, client_checks={"reject_unknown_client": "maybe"})
    proc = ServerProcess(tmp_path, config)
    proc.write_config()
    result = proc.cli("check-config", check=False)
    assert result.returncode != 0
    assert "reject_unknown_client" in result.stdout + result.stderr
