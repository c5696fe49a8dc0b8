"""AUTH in the server core (RFC 4954) and the per-client failure budget (inbound/auth.py)."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from postillon.checks.rate_limit import ip_key as client_key
from postillon.core.clock import FakeClock
from postillon.core.reply import Reply
from postillon.inbound.auth import (
    AuthGuard,
    mechanism_factories,
    scram_credentials,
    scram_primitives,
)
from postillon.protocol import replies as R
from postillon.protocol.events import (
    NEED_DATA,
    AuthAborted,
    Authenticated,
    AuthPassword,
    AuthProof,
    AuthScramLookup,
    CommandRejected,
    Event,
    Hello,
    MailFrom,
)
from postillon.protocol.server import ServerConnection, ServerSettings, State

MECHS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")
NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def connect(**overrides: object) -> ServerConnection:
    values: dict[str, object] = {
        "auth_mechanisms": MECHS,
        "tls_active": True,
        "require_auth": True,
    }
    values.update(overrides)
    settings = ServerSettings("mx.test", **values)  # type: ignore[arg-type]
    prims = dataclasses.replace(scram_primitives(b"k"), nonce=lambda: NONCE)
    conn = ServerConnection(settings, mechanisms=mechanism_factories(prims))
    conn.greet(Reply.of(220, None, "mx.test ESMTP"))
    conn.receive_data(b"EHLO c.test\r\n")
    event = conn.next_event()
    assert isinstance(event, Hello)
    conn.accept_hello()
    assert conn.next_event() is NEED_DATA
    conn.data_to_send()
    return conn


def feed(conn: ServerConnection, data: bytes) -> tuple[list[Event], bytes]:
    if data:  # b"": only collect what the last answer produced
        conn.receive_data(data)
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events, conn.data_to_send()
        assert isinstance(event, Event)
        events.append(event)
        if isinstance(event, AuthPassword | AuthScramLookup | AuthProof | MailFrom):
            return events, conn.data_to_send()


def test_ehlo_advertises_auth_only_with_tls() -> None:
    for tls, plaintext, shown in ((True, False, True), (False, False, False), (False, True, True)):
        conn = ServerConnection(
            ServerSettings(
                "mx.test", auth_mechanisms=MECHS, tls_active=tls, auth_plaintext=plaintext
            ),
            mechanisms=mechanism_factories(scram_primitives()),
        )
        conn.greet(Reply.of(220, None, "mx.test ESMTP"))
        conn.receive_data(b"EHLO c.test\r\n")
        assert isinstance(conn.next_event(), Hello)
        conn.accept_hello()
        out = conn.data_to_send()
        assert (b"250 AUTH SCRAM-SHA-256 PLAIN LOGIN\r\n" in out) is shown


def test_auth_before_tls_is_refused() -> None:
    conn = connect(tls_active=False)
    events, out = feed(conn, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert events == [CommandRejected(R.AUTH_ENCRYPTION_REQUIRED, "AUTH PLAIN ***")]
    assert out.startswith(b"538 5.7.11 ")


def test_plain_success_then_mail_then_second_auth_503() -> None:
    conn = connect()
    events, out = feed(conn, b"MAIL FROM:<a@example.org>\r\n")
    assert out == b"530 5.7.0 Authentication required\r\n"
    events, out = feed(conn, b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
    assert events == [AuthPassword("PLAIN", "alice", "", "secret")]
    assert conn.state is State.AUTH
    conn.auth_accept()
    events, out = feed(conn, b"")
    assert events == [Authenticated("PLAIN", "alice", "")]
    assert out == b"235 2.7.0 Authentication successful\r\n"
    assert conn.authenticated
    assert str(conn.state) == "READY"
    events, out = feed(conn, b"AUTH LOGIN\r\n")
    assert out == b"503 5.5.1 Already authenticated\r\n"
    events, out = feed(conn, b"MAIL FROM:<a@example.org>\r\n")
    assert isinstance(events[0], MailFrom)


def test_plain_failure_is_the_adapters_535() -> None:
    conn = connect()
    feed(conn, b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n")
    with pytest.raises(RuntimeError):
        conn.reply(R.AUTH_SUCCEEDED)  # success goes through auth_accept()
    conn.reply(R.AUTH_FAILED)
    _events, out = feed(conn, b"")
    assert out == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert not conn.authenticated and conn.state is State.READY


def test_plain_with_empty_challenge_and_authzid() -> None:
    conn = connect()
    events, out = feed(conn, b"AUTH PLAIN\r\n")
    assert (events, out) == ([], b"334 \r\n")
    events, out = feed(conn, b64(b"boss\0alice\0secret") + b"\r\n")
    assert events == [AuthPassword("PLAIN", "alice", "boss", "secret")]


def test_login_dialogue() -> None:
    conn = connect()
    assert feed(conn, b"AUTH LOGIN\r\n")[1] == b"334 VXNlcm5hbWU6\r\n"
    assert feed(conn, b"YWxpY2U=\r\n")[1] == b"334 UGFzc3dvcmQ6\r\n"
    events, _ = feed(conn, b"c2VjcmV0\r\n")
    assert events == [AuthPassword("LOGIN", "alice", "", "secret")]


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        (b"AUTH LOGIN\r\n*\r\n", R.AUTH_CANCELLED),
        (b"AUTH LOGIN\r\nnot base64!\r\n", R.AUTH_MALFORMED),
        (b"AUTH PLAIN\r\n" + b64(b"no nuls") + b"\r\n", R.AUTH_MALFORMED),
    ],
)
def test_cancel_and_malformed_responses(lines: bytes, reply: Reply) -> None:
    conn = connect()
    events, out = feed(conn, lines)
    assert events == [AuthAborted(events[0].mechanism, reply)]  # type: ignore[attr-defined]
    assert out.endswith(reply.to_bytes())
    assert conn.state is State.READY


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"AUTH PLAIN !!!!", R.AUTH_MALFORMED),
        (b"AUTH PLAIN AAAA", R.AUTH_MALFORMED),  # three NULs
        (b"AUTH CRAM-MD5", R.AUTH_UNKNOWN_MECHANISM),
        (b"AUTH", R.PARAM_SYNTAX),
        (b"AUTH PLAIN a b", R.PARAM_SYNTAX),
    ],
)
def test_bad_auth_commands(line: bytes, reply: Reply) -> None:
    conn = connect()
    events, _out = feed(conn, line + b"\r\n")
    assert isinstance(events[0], CommandRejected) and events[0].reply == reply
    assert conn.state is State.READY


def test_auth_in_transaction_and_before_hello() -> None:
    conn = connect(require_auth=False)
    feed(conn, b"MAIL FROM:<a@example.org>\r\n")
    conn.reply(Reply.of(250, "2.1.0", "Ok"))
    assert feed(conn, b"AUTH LOGIN\r\n")[1].endswith(R.IN_TRANSACTION.to_bytes())


def test_overlong_response_ends_the_exchange() -> None:
    conn = connect()
    feed(conn, b"AUTH LOGIN\r\n")
    events, out = feed(conn, b"A" * 3000 + b"\r\nNOOP\r\n")
    assert events == [AuthAborted("LOGIN", R.LINE_TOO_LONG)]
    assert out == R.LINE_TOO_LONG.to_bytes() + R.OK.to_bytes()


def test_scram_through_the_core() -> None:
    conn = connect()
    first = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    events, out = feed(conn, b"AUTH SCRAM-SHA-256 " + b64(first) + b"\r\n")
    assert events == [AuthScramLookup("SCRAM-SHA-256", "user", "")]
    conn.auth_credentials(scram_credentials("pencil", SALT))
    events, out = feed(conn, b"")
    assert out.startswith(b"334 ") and base64.b64decode(out[4:]).startswith(b"r=rOpr")
    final = (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    events, out = feed(conn, b64(final) + b"\r\n")
    assert events == [AuthProof("SCRAM-SHA-256", "user", "", True)]
    conn.auth_accept()
    events, out = feed(conn, b"")
    assert base64.b64decode(out[4:]) == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    events, out = feed(conn, b"\r\n")
    assert events == [Authenticated("SCRAM-SHA-256", "user", "")]
    assert out == R.AUTH_SUCCEEDED.to_bytes() and conn.authenticated


def test_scram_invalid_proof_cannot_be_accepted() -> None:
    conn = connect()
    feed(conn, b"AUTH SCRAM-SHA-256 " + b64(b"n,,n=user,r=abc") + b"\r\n")
    conn.auth_credentials(None)
    feed(conn, b"")
    events, _ = feed(conn, b64(b"c=biws,r=abc" + NONCE.encode() + b",p=AAAA") + b"\r\n")
    assert events == [AuthProof("SCRAM-SHA-256", "user", "", False)]
    with pytest.raises(RuntimeError):
        conn.auth_accept()
    conn.reply(R.AUTH_FAILED)
    assert feed(conn, b"")[1] == R.AUTH_FAILED.to_bytes()


def test_421_from_the_adapter_closes() -> None:
    conn = connect()
    feed(conn, b"AUTH PLAIN " + b64(b"\0alice\0x") + b"\r\n")
    conn.reply(R.AUTH_TOO_MANY_FAILURES)
    assert conn.closing and conn.state is State.CLOSED


def test_settings_refuse_unknown_and_plus_mechanisms() -> None:
    for name in ("SCRAM-SHA-256-PLUS", "CRAM-MD5"):
        with pytest.raises(ValueError):
            ServerSettings("mx.test", auth_mechanisms=(name,))
    with pytest.raises(ValueError):  # SCRAM needs its primitives from the adapter
        ServerConnection(ServerSettings("mx.test", auth_mechanisms=("SCRAM-SHA-256",)))


# --- the failure budget ---------------------------------------------------------


def test_guard_delays_then_disconnects_then_blocks() -> None:
    clock = FakeClock()
    guard = AuthGuard(clock, delay_after=3, delay_step=1.0, max_failures=10, block_for=900)
    penalties = [guard.failure("192.0.2.1") for _ in range(10)]
    assert [p.delay for p in penalties[:4]] == [0.0, 0.0, 0.0, 1.0]
    assert penalties[8].delay == 6.0 and not penalties[8].disconnect
    assert penalties[9].disconnect
    assert guard.blocked("192.0.2.1") and not guard.blocked("192.0.2.2")
    clock.advance(901)
    assert not guard.blocked("192.0.2.1") and guard.failures("192.0.2.1") == 0


def test_guard_window_forgets_old_failures() -> None:
    clock = FakeClock()
    guard = AuthGuard(clock, window=60)
    for _ in range(5):
        guard.failure("192.0.2.1")
    clock.advance(61)
    assert guard.failure("192.0.2.1").failures == 1


def test_client_key_groups_ipv6_by_64() -> None:
    assert client_key("2001:db8::1") == client_key("2001:db8::2") == "2001:db8::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("local") == "local"
