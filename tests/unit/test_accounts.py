"""The accounts file: hashes, SCRAM keys, reload on change, atomic writes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import pytest

from postillon.core.account import Account, CredentialStore
from postillon.inbound import accounts as accounts_mod
from postillon.inbound.accounts import (
    AccountError,
    AccountExists,
    AccountStore,
    NoSuchAccount,
    accounts_path,
    saslprep,
    scram_sha256_credentials,
)

FAST_N = 1 << 10  # tests use a cheap scrypt; the default is 2^15


class Ticks:
    """A monotonic clock tests move by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_store(path: Path, clock: Ticks | None = None) -> AccountStore:
    return AccountStore(path, clock=clock or Ticks(), scrypt_n=FAST_N)


@pytest.fixture
def store(tmp_path: Path) -> AccountStore:
    return make_store(tmp_path / "accounts.json")


# -- RFC 7677 §3 example ------------------------------------------------------------------

SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FIRST_BARE = b"n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
CLIENT_FINAL_NO_PROOF = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
PROOF = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
SERVER_SIGNATURE = base64.b64decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_scram_keys_match_rfc7677_example() -> None:
    creds = scram_sha256_credentials("pencil", SALT, 4096)
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", SALT, 4096)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    assert creds.stored_key == hashlib.sha256(client_key).digest()
    assert creds.server_key == hmac.digest(salted, b"Server Key", "sha256")
    assert creds.salt == SALT and creds.iterations == 4096


def test_rfc7677_exchange_verifies_with_stored_keys_only() -> None:
    # What a SCRAM server does with only StoredKey/ServerKey (RFC 5802 §3).
    creds = scram_sha256_credentials("pencil", SALT, 4096)
    auth_message = b",".join((CLIENT_FIRST_BARE, SERVER_FIRST, CLIENT_FINAL_NO_PROOF))
    client_signature = hmac.digest(creds.stored_key, auth_message, "sha256")
    client_key = bytes(a ^ b for a, b in zip(PROOF, client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() == creds.stored_key
    assert hmac.digest(creds.server_key, auth_message, "sha256") == SERVER_SIGNATURE
    # A wrong password's keys do not verify the same proof.
    wrong = scram_sha256_credentials("pencil2", SALT, 4096)
    sig = hmac.digest(wrong.stored_key, auth_message, "sha256")
    key = bytes(a ^ b for a, b in zip(PROOF, sig, strict=True))
    assert hashlib.sha256(key).digest() != wrong.stored_key


def test_stored_scram_credentials_round_trip(store: AccountStore) -> None:
    store.add("user@example.com", "pencil")
    creds = store.scram_credentials("user@example.com")
    assert creds is not None and creds.iterations >= 4096
    assert creds == scram_sha256_credentials("pencil", creds.salt, creds.iterations)
    assert store.scram_credentials("nobody@example.com") is None
    fake = store.fake_scram_credentials("nobody@example.com")
    assert fake == store.fake_scram_credentials("NoBody@example.com")  # stable per name
    assert fake.salt != store.fake_scram_credentials("other@example.com").salt


def test_scram_iterations_below_rfc_minimum_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        AccountStore(tmp_path / "a.json", scram_iterations=1000)


# -- scrypt verify ----------------------------------------------------------------------


def test_implements_credential_store(store: AccountStore) -> None:
    cs: CredentialStore = store
    assert cs.get("x@example.com") is None


def test_add_and_verify(store: AccountStore) -> None:
    account = store.add("Alice@Example.com", "correct horse", ["alice@example.com", "*@alias.test"])
    assert account == Account("alice@example.com", ("alice@example.com", "*@alias.test"))
    assert store.verify_password("alice@example.com", "correct horse") == account
    assert store.verify_password("ALICE@example.com", "correct horse") == account
    assert store.verify_password("alice@example.com", "wrong") is None
    assert store.verify_password("alice@example.com", "") is None
    assert store.get("alice@example.com") == account


def test_addresses_default_to_username(store: AccountStore) -> None:
    assert store.add("bob@example.com", "pw").addresses == ("bob@example.com",)


def test_scrypt_parameters_recorded_per_user(store: AccountStore) -> None:
    password = "correct horse battery staple"  # spaces: never in base64 or hex by chance
    store.add("alice@example.com", password)
    data = json.loads(store.path.read_text())
    rec = data["users"]["alice@example.com"]["scrypt"]
    assert (rec["n"], rec["r"], rec["p"]) == (FAST_N, 8, 1)
    assert len(base64.b64decode(rec["salt"])) == 16
    assert password not in store.path.read_text()
    # A store with other defaults still verifies the recorded parameters.
    other = AccountStore(store.path, scrypt_n=1 << 11)
    assert other.verify_password("alice@example.com", password) is not None


def test_same_password_gets_different_salts(store: AccountStore) -> None:
    store.add("a@example.com", "same")
    store.add("b@example.com", "same")
    users = json.loads(store.path.read_text())["users"]
    assert users["a@example.com"]["scrypt"]["hash"] != users["b@example.com"]["scrypt"]["hash"]


def test_unknown_user_spends_a_dummy_hash(
    store: AccountStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add("alice@example.com", "pw")
    calls: list[int] = []
    real = accounts_mod.scrypt_hash

    def counting(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
        calls.append(n)
        return real(password, salt, n, r, p)

    monkeypatch.setattr(accounts_mod, "scrypt_hash", counting)
    assert store.verify_password("nobody@example.com", "pw") is None
    assert calls == [FAST_N]  # same work as a known user with a wrong password
    assert store.verify_password("alice@example.com", "nope") is None
    assert calls == [FAST_N, FAST_N]
    # An unusable password (control character) on a known user costs the same too.
    assert store.verify_password("alice@example.com", "p\x00w") is None
    assert calls == [FAST_N] * 3


def test_passwd_and_delete(store: AccountStore) -> None:
    store.add("alice@example.com", "old")
    store.set_password("alice@example.com", "new")
    assert store.verify_password("alice@example.com", "old") is None
    assert store.verify_password("alice@example.com", "new") is not None
    store.delete("alice@example.com")
    assert store.get("alice@example.com") is None
    with pytest.raises(NoSuchAccount):
        store.delete("alice@example.com")
    with pytest.raises(NoSuchAccount):
        store.set_password("alice@example.com", "x")


def test_add_twice_refused(store: AccountStore) -> None:
    store.add("alice@example.com", "pw")
    with pytest.raises(AccountExists):
        store.add("ALICE@example.com", "pw")


@pytest.mark.parametrize("bad", ["", "a b@example.com", "tab\t@x.org"])
def test_bad_usernames(store: AccountStore, bad: str) -> None:
    with pytest.raises(AccountError):
        store.add(bad, "pw")


@pytest.mark.parametrize("bad", ["nodomain", "@example.com", "a@", "a@localhost", "a b@x.org"])
def test_bad_addresses(store: AccountStore, bad: str) -> None:
    with pytest.raises(AccountError):
        store.add("alice@example.com", "pw", [bad])


def test_empty_password_refused(store: AccountStore) -> None:
    with pytest.raises(AccountError):
        store.add("alice@example.com", "")


def test_saslprep() -> None:
    assert saslprep("pencil") == "pencil"
    assert saslprep("I\u00adX") == "IX"  # soft hyphen mapped to nothing (RFC 4013 §3 ex.)
    assert saslprep("\u2168") == "IX"  # NFKC
    assert saslprep("a\u00a0b") == "a b"  # non-ASCII space → space
    with pytest.raises(AccountError):
        saslprep("\x07")
    with pytest.raises(AccountError):
        saslprep("\u0627\u0031")  # RTL must end with RTL


def test_non_ascii_password_agrees_for_plain_and_scram(store: AccountStore) -> None:
    store.add("u@example.com", "I\u00adX")
    assert store.verify_password("u@example.com", "IX") is not None
    creds = store.scram_credentials("u@example.com")
    assert creds == scram_sha256_credentials("IX", creds.salt, creds.iterations)


# -- the file ----------------------------------------------------------------------------


def test_file_mode_0600_and_no_temp_left(store: AccountStore) -> None:
    old = os.umask(0)
    try:
        store.add("alice@example.com", "pw")
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in store.path.parent.iterdir()) == [
        "accounts.json",
        "accounts.json.lock",
    ]


def test_failed_rename_leaves_old_file_intact(
    store: AccountStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add("alice@example.com", "pw")
    before = store.path.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accounts_mod.os, "replace", boom)
    with pytest.raises(OSError):
        store.add("bob@example.com", "pw")
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert not [p for p in store.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert store.get("bob@example.com") is None


def test_failed_fsync_leaves_old_file_intact(
    store: AccountStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add("alice@example.com", "pw")
    before = store.path.read_bytes()

    def boom(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(accounts_mod.os, "fsync", boom)
    with pytest.raises(OSError):
        store.delete("alice@example.com")
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert not [p for p in store.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_write_fsyncs_file_and_directory(
    store: AccountStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bool] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(accounts_mod.os, "fsync", spy)
    store.add("alice@example.com", "pw")
    assert synced == [False, True]


def test_reload_on_change_at_most_once_per_second(tmp_path: Path) -> None:
    clock = Ticks()
    server = make_store(tmp_path / "accounts.json", clock)  # the server's view
    cli = make_store(tmp_path / "accounts.json")  # another process's
    assert server.get("alice@example.com") is None
    cli.add("alice@example.com", "pw")
    clock.t += 0.5
    assert server.get("alice@example.com") is None  # not looked at yet
    clock.t += 0.6
    assert server.get("alice@example.com") is not None
    cli.set_password("alice@example.com", "new")
    clock.t += 1.1
    assert server.verify_password("alice@example.com", "new") is not None
    cli.delete("alice@example.com")
    clock.t += 1.1
    assert server.get("alice@example.com") is None


def test_damaged_file_on_reload_keeps_previous(tmp_path: Path) -> None:
    clock = Ticks()
    path = tmp_path / "accounts.json"
    make_store(path).add("alice@example.com", "pw")
    server = make_store(path, clock)
    path.write_text("{not json")
    clock.t += 2
    assert server.get("alice@example.com") is not None
    with pytest.raises(AccountError, match="damaged"):
        make_store(path)  # at start-up: an error, not an empty store
    with pytest.raises(AccountError):
        server.add("bob@example.com", "pw")  # never overwrite a damaged file
    assert path.read_text() == "{not json"


def test_concurrent_writers_do_not_lose_updates(tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    a, b = make_store(path), make_store(path)
    a.add("one@example.com", "pw")
    b.add("two@example.com", "pw")  # b's cache is stale; its edit rereads under the lock
    assert {acc.username for acc, _, _ in make_store(path).users()} == {
        "one@example.com",
        "two@example.com",
    }


def test_accounts_path_default_and_override(tmp_path: Path) -> None:
    assert accounts_path(tmp_path, None) == tmp_path / "accounts.json"
    assert accounts_path(tmp_path, Path("/etc/x.json")) == Path("/etc/x.json")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_root_gives_file_to_data_dir_owner(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chown(data_dir, 4321, 4321)
    store = make_store(data_dir / "accounts.json")
    store.add("alice@example.com", "pw")
    st = store.path.stat()
    assert (st.st_uid, st.st_gid) == (4321, 4321)
    lock = (data_dir / "accounts.json.lock").stat()
    assert (lock.st_uid, lock.st_gid) == (4321, 4321)
