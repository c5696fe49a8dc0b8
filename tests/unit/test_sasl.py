"""SASL mechanisms (protocol/sasl.py): PLAIN, LOGIN, SCRAM-SHA-256, strict base64."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from postillon.inbound.auth import scram_credentials, scram_primitives
from postillon.protocol.sasl import (
    Challenge,
    CheckPassword,
    Login,
    NeedScramCredentials,
    Plain,
    SaslError,
    ScramSha256,
    ScramVerdict,
    Success,
    b64decode,
    b64encode,
)

# RFC 7677 §3 test vector (user "user", password "pencil").
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def scram() -> ScramSha256:
    prims = dataclasses.replace(scram_primitives(b"k"), nonce=lambda: SERVER_NONCE)
    return ScramSha256(prims)


@pytest.mark.parametrize("data", [b"", b"f", b"fo", b"foo", b"foob", b"\x00\xff" * 7])
def test_base64_round_trip_matches_stdlib(data: bytes) -> None:
    assert b64encode(data) == base64.b64encode(data).decode()
    assert b64decode(b64encode(data)) == data


@pytest.mark.parametrize("text", ["A", "AB=", "A===", "AB!C", "Zm9v\n", "Zh==", "Zm9=", " Zm9v"])
def test_base64_is_strict(text: str) -> None:
    with pytest.raises(SaslError):
        b64decode(text)


def test_plain_with_initial_response() -> None:
    assert Plain().start(b"\0alice\0secret") == CheckPassword("alice", "secret", "")


def test_plain_with_authzid_and_challenge() -> None:
    mech = Plain()
    assert mech.start(None) == Challenge(b"")
    assert mech.respond(b"boss\0alice\0secret") == CheckPassword("alice", "secret", "boss")
    assert "secret" not in repr(CheckPassword("alice", "secret"))


@pytest.mark.parametrize(
    "data", [b"", b"\0\0\0", b"alice\0secret", b"\0\0secret", b"\0alice\0", b"\0al\xffice\0x"]
)
def test_plain_malformed(data: bytes) -> None:
    with pytest.raises(SaslError):
        Plain().start(data)


def test_login_dialogue() -> None:
    mech = Login()
    assert mech.start(None) == Challenge(b"Username:")
    assert mech.respond(b"alice") == Challenge(b"Password:")
    assert mech.respond(b"secret") == CheckPassword("alice", "secret")
    with pytest.raises(SaslError):
        mech.respond(b"more")


def test_login_initial_response_is_the_username() -> None:
    mech = Login()
    assert mech.start(b"alice") == Challenge(b"Password:")
    with pytest.raises(SaslError):
        mech.respond(b"")


def test_scram_sha256_rfc7677_vector() -> None:
    mech = scram()
    assert mech.start(CLIENT_FIRST) == NeedScramCredentials("user", "")
    creds = scram_credentials("pencil", SALT, 4096)
    assert mech.credentials(creds) == Challenge(SERVER_FIRST)
    assert mech.respond(CLIENT_FINAL) == ScramVerdict("user", "", True, SERVER_FINAL)
    assert mech.respond(b"") == Success()


def test_scram_wrong_password_fails_at_the_proof() -> None:
    mech = scram()
    mech.start(CLIENT_FIRST)
    mech.credentials(scram_credentials("not pencil", SALT, 4096))
    verdict = mech.respond(CLIENT_FINAL)
    assert isinstance(verdict, ScramVerdict) and not verdict.valid
    with pytest.raises(SaslError):
        mech.respond(b"")


def test_scram_unknown_user_looks_the_same_and_fails() -> None:
    mech = scram()
    mech.start(None)
    assert mech.respond(CLIENT_FIRST) == NeedScramCredentials("user", "")
    first = mech.credentials(None)
    assert isinstance(first, Challenge) and first.data.endswith(b",i=4096")
    again = scram()
    again.start(CLIENT_FIRST)
    assert again.credentials(None) == first  # the made-up salt is stable per user
    verdict = mech.respond(CLIENT_FINAL)
    assert isinstance(verdict, ScramVerdict) and not verdict.valid


def test_scram_nonce_mismatch_fails() -> None:
    mech = scram()
    mech.start(CLIENT_FIRST)
    mech.credentials(scram_credentials("pencil", SALT, 4096))
    verdict = mech.respond(CLIENT_FINAL.replace(b"k0,p=", b"k1,p="))
    assert isinstance(verdict, ScramVerdict) and not verdict.valid


def test_scram_authzid_and_escaped_name() -> None:
    mech = scram()
    step = mech.start(b"n,a=bo=3Dss,n=al=2Cice,r=abc")
    assert step == NeedScramCredentials("al,ice", "bo=ss")


@pytest.mark.parametrize(
    "first",
    [
        b"p=tls-exporter,,n=user,r=abc",  # channel binding: -PLUS is not offered
        b"x,,n=user,r=abc",
        b"n,,r=abc,n=user",
        b"n,,n=user,r=abc,m=ext",
        b"n,,n=us=er,r=abc",
        b"n,z=a,n=user,r=abc",
        b"n,,n=user,r=a,b",
        b"n,,n=user",
    ],
)
def test_scram_malformed_client_first(first: bytes) -> None:
    with pytest.raises(SaslError):
        scram().start(first)


def test_scram_malformed_client_final() -> None:
    mech = scram()
    mech.start(CLIENT_FIRST)
    mech.credentials(scram_credentials("pencil", SALT, 4096))
    with pytest.raises(SaslError):
        mech.respond(b"c=biws,r=x")
