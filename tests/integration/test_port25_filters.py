"""Greylisting, port-25 rate limits and policy delegation through the real ``postillon serve``.

    smtplib ──RCPT──▶ postillon (port 25 listener) ── pipeline: relay → rate limit →
                                                      greylist → [[policy_service]]
                         │ state: queue store (SQLite file / PostgreSQL shared by nodes)
                         └──name=value──▶ postgrey / a tiny policy server (loopback)

Every wait polls (retry until accepted), never asserts wall-clock times.
"""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.ports import free_port
from support.postgrey import Postgrey
from support.server import ServerProcess

pytestmark = pytest.mark.integration

MakeServer = Callable[..., ServerProcess]
MESSAGE = b"From: ann@sender.test\r\nSubject: hi\r\n\r\nhello\r\n"


def smtp(server: ServerProcess) -> smtplib.SMTP:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    client = smtplib.SMTP(host, int(port), timeout=10)
    client.ehlo("client.test")
    return client


def attempt(server: ServerProcess, rcpt: str, sender: str = "ann@sender.test") -> tuple[int, str]:
    """One transaction; the RCPT reply (and the message sent when it was 250)."""
    with smtp(server) as client:
        code, text = client.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = client.rcpt(rcpt)
        if code == 250:
            data_code, data_text = client.data(MESSAGE)
            assert data_code == 250, data_text
        return code, text.decode()


def retry_until_accepted(server: ServerProcess, rcpt: str, timeout: float = 30) -> list[int]:
    """Retry as an MTA would (every 0.2 s here) until RCPT gets 250; every reply code."""
    codes: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, _ = attempt(server, rcpt)
        codes.append(code)
        if code == 250:
            return codes
        time.sleep(0.2)
    raise AssertionError(f"never accepted: {codes[-5:]}\n{server.maillog()[-2000:]}")


GREYLIST = {"enabled": True, "delay": 1, "auto_allow_after": 0}


def test_greylisted_first_attempt_then_the_retry_is_accepted_and_a_restart_keeps_it(
    make_server: MakeServer,
) -> None:
    a = make_server(greylist=GREYLIST).start()
    code, text = attempt(a, "bob@example.org")
    assert code == 450 and text.startswith("4.7.1 Greylisted: please try again in"), text
    codes = retry_until_accepted(a, "bob@example.org")
    assert set(codes[:-1]) <= {450}
    a.wait_for_mail("bob@example.org")
    # An unknown recipient is refused by the relay check, never greylisted.
    assert attempt(a, "nobody@example.org")[0] == 550
    # The state is in the queue store: after a restart the triplet is known.
    a.stop()
    a.start()
    assert attempt(a, "bob@example.org")[0] == 250
    # A trusted client is never greylisted.
    b = make_server(greylist=GREYLIST, relay={"trusted_networks": ["127.0.0.0/8"]}).start()
    assert attempt(b, "alice@example.org")[0] == 250


def test_port_25_rate_limit_per_client(make_server: MakeServer) -> None:
    a = make_server(smtp_rate_limits={"window": 7 * 86400, "client_messages": 2}).start()
    assert attempt(a, "bob@example.org")[0] == 250
    assert attempt(a, "bob@example.org")[0] == 250
    with smtp(a) as client:
        code, text = client.mail("ann@sender.test")
    assert code == 450 and b"4.7.1 Rate limit exceeded for this client" in text, text
    assert "rate limit" in a.wait_for_log("rate limit")


class TinyPolicyServer:
    """A thread answering the policy protocol: REJECT for blocked@, PREPEND otherwise."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.requests: list[dict[str, str]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            attrs: dict[str, str] = {}
            for line in f:
                text = line.decode().rstrip("\n")
                if text:
                    name, _, value = text.partition("=")
                    attrs[name] = value
                    continue
                self.requests.append(attrs)
                if attrs.get("recipient", "").startswith("alice@"):
                    f.write(b"action=REJECT 5.7.1 alice takes no mail from you\n\n")
                else:
                    f.write(
                        b"action=PREPEND X-Policy-Seen: "
                        + attrs["client_address"].encode()
                        + b"\n\n"
                    )
                f.flush()
                attrs = {}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def tiny_policy() -> Iterator[TinyPolicyServer]:
    server = TinyPolicyServer()
    yield server
    server.close()


def test_policy_service_reject_and_prepend(
    make_server: MakeServer, tiny_policy: TinyPolicyServer
) -> None:
    policy = {"name": "tiny", "address": f"inet:127.0.0.1:{tiny_policy.port}", "timeout": 5}
    a = make_server(policy_service=[policy]).start()
    code, text = attempt(a, "alice@example.org")
    assert (code, text) == (554, "5.7.1 alice takes no mail from you")
    assert attempt(a, "bob@example.org")[0] == 250
    (path,) = a.wait_for_mail("bob@example.org")
    assert b"X-Policy-Seen: 127.0.0.1" in path.read_bytes().split(b"\n\n")[0]
    request = tiny_policy.requests[-1]
    assert request["protocol_state"] == "RCPT" and request["helo_name"] == "client.test"
    assert request["sender"] == "ann@sender.test" and request["recipient"] == "bob@example.org"


def test_policy_service_down_is_the_default_action(make_server: MakeServer) -> None:
    dead = f"inet:127.0.0.1:{free_port()}"
    a = make_server(policy_service=[{"name": "down", "address": dead, "timeout": 1}]).start()
    code, text = attempt(a, "bob@example.org")
    assert code == 451 and text.startswith("4.3.0"), text
    b = make_server(
        policy_service=[{"name": "down", "address": dead, "timeout": 1, "default_action": "accept"}]
    ).start()
    assert attempt(b, "bob@example.org")[0] == 250


def test_postgrey_through_postillon(make_server: MakeServer) -> None:
    with Postgrey(delay=1) as postgrey:
        a = make_server(policy_service=[{"name": "postgrey", "address": postgrey.address}]).start()
        code, text = attempt(a, "bob@example.org")
        assert code == 450 and "Greylisted" in text, text
        retry_until_accepted(a, "bob@example.org")
        (path,) = a.wait_for_mail("bob@example.org")
        header = path.read_bytes().split(b"\n\n")[0]
        assert b"X-Greylist: delayed" in header and b"postgrey" in header, header


def test_greylisted_on_node_1_passes_on_node_2(make_server: MakeServer, postgres_dsn: str) -> None:
    """Two nodes on one PostgreSQL queue share the greylist: the first attempt on node 1
    is refused, the retry after the delay on node 2 is accepted."""
    queue: dict[str, Any] = {"store": "postgresql", "dsn": postgres_dsn}
    one = make_server(queue=queue, greylist=GREYLIST)
    two = make_server(queue=queue, greylist=GREYLIST)
    one.write_config()
    one.cli("db", "migrate")
    one.start()
    two.start()
    code, _ = attempt(one, "bob@example.org")
    assert code == 450
    # Node 2 has never seen the client: still greylisted early, then passed once the
    # delay (1 s) is over: polled, as a retrying MTA would.
    codes = retry_until_accepted(two, "bob@example.org")
    assert codes[-1] == 250 and set(codes[:-1]) <= {450}
    # And node 1 now knows the triplet as well.
    assert attempt(one, "bob@example.org")[0] == 250


def explain(server: ServerProcess, *args: str, expect: str) -> str:
    """``postillon explain ARGS`` once its output has ``expect`` (the trace is flushed
    every 0.1 s): polled, no fixed wait."""
    deadline = time.monotonic() + 20
    while True:
        out = server.cli("explain", *args, check=False).stdout
        if expect in out or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def test_explain_tells_the_greylisting_and_simulate_records_nothing(
    make_server: MakeServer, tmp_path: Any
) -> None:
    a = make_server(
        greylist={"enabled": True, "delay": 600, "auto_allow_after": 0},
        explain={"flush_interval": 0.1},
    ).start()
    assert attempt(a, "bob@example.org")[0] == 450
    out = explain(a, "--client", "127.0.0.1", "--rejected", expect="greylist: reject")
    assert (
        "rcpt · greylist: reject — triplet (127.0.0.0/24, <ann@sender.test>, <bob@example.org>)"
        in out
    ), out
    assert "new, retry in 600s" in out
    # --simulate sees the stored triplet (early) and a new one, and records neither.
    saved = tmp_path / "saved.eml"
    saved.write_bytes(MESSAGE.replace(b"\r\n", b"\n"))
    common = ["--simulate", str(saved), "--client", "127.0.0.9", "--from", "ann@sender.test"]
    known = a.cli("explain", *common, "--to", "bob@example.org").stdout
    assert "greylist: reject — triplet (127.0.0.0/24" in known and "early, retry in" in known, known
    fresh = a.cli("explain", *common, "--to", "alice@example.org").stdout
    assert "greylist: reject" in fresh and "new, retry in 600s" in fresh, fresh
    again = a.cli("explain", *common, "--to", "alice@example.org").stdout
    assert "new, retry in 600s" in again  # the simulation recorded nothing


def test_a_dnswl_listed_client_is_not_greylisted(make_server: MakeServer, make_dns_server) -> None:  # type: ignore[no-untyped-def]
    """The DNSBL check at connect leaves a "dnswl" note for a client an allow-list
    vouches for (negative weight); greylisting then lets it through at once. An unlisted
    client (127.0.0.2) is greylisted as usual."""
    dns = make_dns_server(
        {"list.dnswl.example": {"1.0.0.127.list.dnswl.example": {"A": "127.0.10.2"}}}
    )
    a = make_server(
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        dnsbl={"zones": {"list.dnswl.example": -2}, "threshold": 2},
        greylist={"enabled": True, "delay": 600, "auto_allow_after": 0},
    ).start()
    assert attempt(a, "bob@example.org")[0] == 250  # from 127.0.0.1: listed
    host, _, port = a.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10, source_address=("127.0.0.2", 0)) as client:
        client.ehlo("client.test")
        client.mail("ann@sender.test")
        code, text = client.rcpt("bob@example.org")
    assert code == 450 and b"Greylisted" in text


def test_two_nodes_share_one_rate_limit(make_server: MakeServer, postgres_dsn: str) -> None:
    """The counters are in the shared queue: 3 messages per client per window across
    the cluster, whichever node takes them."""
    queue: dict[str, Any] = {"store": "postgresql", "dsn": postgres_dsn}
    limits = {"window": 7 * 86400, "client_messages": 3}  # no window boundary mid-test
    one = make_server(queue=queue, smtp_rate_limits=limits)
    two = make_server(queue=queue, smtp_rate_limits=limits)
    one.write_config()
    one.cli("db", "migrate")
    one.start()
    two.start()
    assert [attempt(node, "bob@example.org")[0] for node in (one, two, one)] == [250, 250, 250]
    for node in (two, one):
        with smtp(node) as client:
            code, text = client.mail("ann@sender.test")
        assert code == 450 and b"Rate limit exceeded for this client" in text, text
