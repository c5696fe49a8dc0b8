"""The accounts file: users who may submit mail, their hashed passwords and addresses.

Design note. One JSON file (default ``<data_dir>/accounts.json``, mode 0600)
is the whole database; ``postillon user ...`` edits it and the server only
reads it. Every write is atomic (tmp in the same directory, fsync, rename,
fsync the directory), so the server sees the old file or the new one, never
half of one; writers take an ``flock`` on ``<file>.lock`` so two CLI runs do
not lose each other's change. The server notices a new file by its
(mtime, size, inode), looked at on a lookup at most once a second: no
signal, no restart.

Per user the file holds:

- ``scrypt``: n, r, p, salt and the derived key (stdlib ``hashlib.scrypt``),
  checked for PLAIN/LOGIN with ``hmac.compare_digest``;
- ``scram-sha-256``: RFC 5802 §3 stored credentials (salt, iterations,
  StoredKey, ServerKey; RFC 7677), so SCRAM works without the password;
- ``addresses``: what the user may send as (default: the username); an entry
  ``*@domain`` allows every local part of that domain.

Passwords are SASLprep'd (RFC 4013) before both hashes, as RFC 5802 §2.2 and
RFC 4616 §2 ask, so PLAIN and SCRAM agree on non-ASCII passwords. Usernames
are compared after ``strip().lower()`` (they are normally email addresses).

An unknown user costs the same scrypt work as a known one (a dummy hash), so
the time of a failed login does not tell whether the user exists; for SCRAM,
``fake_scram_credentials`` gives a stable made-up salt for the same reason
(and today's iteration count: an account still on an older count stands out
until its password is set again).

The server runs as ``postillon`` after dropping root; when the CLI runs as
root it gives the file to the owner of its directory (data_dir), so the
server can still read a file the administrator wrote.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import stringprep
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from postillon.core.account import Account, ScramCredentials
from postillon.osutil.safeio import write_file

log = logging.getLogger("postillon.accounts")

FILE_VERSION = 1
ACCOUNTS_FILE = "accounts.json"
# RFC 7914 §2 / OWASP: N=2^15, r=8, p=1 is 32 MiB and ~50-100 ms per check.
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
# PBKDF2-SHA256 iterations of newly made SCRAM verifiers. RFC 7677 §4 asks
# for at least 4096, but the verifier sits beside the scrypt hash in the same
# file, so a leaked file is only as strong as the cheaper of the two: at 4096
# a guess cost an attacker 0.7 ms of one core, against 66 ms for our scrypt.
# 600,000 is OWASP's 2023 figure for PBKDF2-HMAC-SHA256. Measured on the
# 2-core test machine (Python hashlib): scrypt N=2^15 66 ms; PBKDF2 4096
# 0.7 ms, 100,000 17.6 ms, 600,000 105 ms. Who pays it: SCRAM's server side
# is a few HMACs (8 µs) whatever the count, since it keeps StoredKey and
# ServerKey; the client pays the iterations once per login (105 ms, about a
# PLAIN login's 66 ms of scrypt on the server), and the server only when a
# password is set. That cost is not excessive, so SCRAM stays on for every
# account rather than opt-in. On GPUs PBKDF2 stays cheaper than memory-hard
# scrypt: the remaining gap is the price of offering SCRAM at all.
# The count is stored with each verifier: accounts made with 4096 keep
# working, and get the new count when their password is next set.
SCRAM_ITERATIONS = 600_000
RELOAD_INTERVAL = 1.0  # seconds between stat() calls on lookups
MAX_PASSWORD = 1024  # bytes; a longer "password" is an attack on the hash


class AccountError(Exception):
    """A user-facing problem with the accounts file or a request; ``str()`` says what."""


class AccountExists(AccountError):
    pass


class NoSuchAccount(AccountError):
    pass


# -- SASLprep (RFC 4013) ------------------------------------------------------------


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep of a password (stored strings: unassigned code points refused)."""
    if text.isascii():
        # Fast path: only control characters can be wrong in ASCII.
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise AccountError("password contains a control character")
        return text
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    norm = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    for c in norm:
        if any(check(c) for check in prohibited):
            raise AccountError(f"password contains a prohibited character U+{ord(c):04X}")
    # RFC 3454 §6 bidi rule.
    if any(stringprep.in_table_d1(c) for c in norm):
        if any(stringprep.in_table_d2(c) for c in norm):
            raise AccountError("password mixes left-to-right and right-to-left text")
        if not (stringprep.in_table_d1(norm[0]) and stringprep.in_table_d1(norm[-1])):
            raise AccountError("password: right-to-left text must start and end with RTL")
    return norm


# -- hashes -------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def scrypt_hash(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem must exceed 128*n*r (plus slack) or OpenSSL refuses.
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=SCRYPT_DKLEN, maxmem=256 * n * r + (1 << 20)
    )


def scram_sha256_credentials(password: str, salt: bytes, iterations: int) -> ScramCredentials:
    """RFC 5802 §3: SaltedPassword = Hi(SASLprep(password), salt, i) (PBKDF2-HMAC-SHA-256),
    StoredKey = H(HMAC(SaltedPassword, "Client Key")), ServerKey = HMAC(SaltedPassword,
    "Server Key")."""
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return ScramCredentials(
        salt=salt,
        iterations=iterations,
        stored_key=hashlib.sha256(client_key).digest(),
        server_key=hmac.digest(salted, b"Server Key", "sha256"),
    )


@dataclass(frozen=True, slots=True)
class _Scrypt:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def verify(self, password: bytes) -> bool:
        return hmac.compare_digest(
            scrypt_hash(password, self.salt, self.n, self.r, self.p), self.key
        )


@dataclass(frozen=True, slots=True)
class _Entry:
    account: Account
    scrypt: _Scrypt
    scram: ScramCredentials
    created: str
    updated: str


def normalize_username(username: str) -> str:
    return username.strip().lower()


def check_username(username: str) -> str:
    """The normalised username, or AccountError saying what is wrong with it."""
    name = normalize_username(username)
    if not name:
        raise AccountError("username must not be empty")
    if len(name) > 255:
        raise AccountError("username is longer than 255 characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise AccountError(f"username {username!r} contains a space or control character")
    return name


def check_address(address: str) -> str:
    """An address a user may send as: ``local@domain`` or ``*@domain``; domain lower-cased."""
    text = address.strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in text):
        raise AccountError(f"address {address!r} must look like name@example.com or *@example.com")
    if "." not in domain and not domain.startswith("["):
        raise AccountError(f"address {address!r}: domain {domain!r} has no dot")
    return f"{local}@{domain.lower().rstrip('.')}"


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the store ------------------------------------------------------------------------


class AccountStore:
    """``CredentialStore`` over the accounts file, plus the edits ``postillon user`` makes.

    Lookups (``get``, ``verify_password``, ``scram_credentials``) are
    thread-safe and reload the file when it changed. Edits (``add``,
    ``set_password``, ``delete``) are a transaction: lock ``<file>.lock`` →
    read the file afresh → change one entry → atomic write → unlock.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        reload_interval: float = RELOAD_INTERVAL,
        scrypt_n: int = SCRYPT_N,
        scrypt_r: int = SCRYPT_R,
        scrypt_p: int = SCRYPT_P,
        scram_iterations: int = SCRAM_ITERATIONS,
    ) -> None:
        if scram_iterations < 4096:
            raise ValueError("RFC 7677 asks for at least 4096 SCRAM iterations")
        self.path = path
        self._clock = clock
        self._interval = reload_interval
        self._n, self._r, self._p = scrypt_n, scrypt_r, scrypt_p
        self._iterations = scram_iterations
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at: float | None = None
        self._dummy = _Scrypt(
            scrypt_n, scrypt_r, scrypt_p, secrets.token_bytes(16), secrets.token_bytes(32)
        )
        self._fake_secret = secrets.token_bytes(32)
        self._reload(force=True)  # a broken file is an error at start-up, not later

    # -- reading ---------------------------------------------------------------------
    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reload(self, force: bool = False) -> None:
        with self._lock:
            now = self._clock()
            if (
                not force
                and self._checked_at is not None
                and now - self._checked_at < self._interval
            ):
                return
            self._checked_at = now
            stamp = self._stat()
            if stamp == self._stamp and not force:
                return
            try:
                entries = self._read_file()
            except AccountError:
                if force:
                    raise
                # Keep serving the last good file; the operator sees the log line.
                log.exception("accounts file %s unreadable; keeping the previous one", self.path)
                self._stamp = stamp
                return
            self._entries, self._stamp = entries, stamp
            if not force:
                log.info("accounts file %s reloaded: %d user(s)", self.path, len(entries))

    def _read_file(self) -> dict[str, _Entry]:
        return {name: _parse_entry(name, item) for name, item in self._read_raw().items()}

    def _read_raw(self) -> dict[str, dict[str, Any]]:
        """The users table as stored, validated; {} when there is no file yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise AccountError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
                raise AccountError(f"{self.path}: not a version {FILE_VERSION} accounts file")
            users = {normalize_username(k): v for k, v in data["users"].items()}
            for name, item in users.items():
                _parse_entry(name, item)
            return users
        except AccountError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AccountError(f"{self.path}: damaged accounts file ({exc!r})") from None

    def _lookup(self, username: str) -> _Entry | None:
        self._reload()
        return self._entries.get(normalize_username(username))

    # -- CredentialStore ---------------------------------------------------------------
    def get(self, username: str) -> Account | None:
        entry = self._lookup(username)
        return entry.account if entry else None

    def verify_password(self, username: str, password: str) -> Account | None:
        """Constant-time check (blocking: a slow hash; call from a thread).

        An unknown user, an unusable password and a wrong password all cost
        one scrypt of similar parameters and return None."""
        entry = self._lookup(username)
        try:
            secret = saslprep(password).encode("utf-8")
        except AccountError:
            secret = b""
            entry = None
        if len(secret) > MAX_PASSWORD:
            secret, entry = secret[:MAX_PASSWORD], None
        if entry is None:
            self._dummy.verify(secret)
            return None
        return entry.account if entry.scrypt.verify(secret) else None

    def scram_credentials(self, username: str) -> ScramCredentials | None:
        entry = self._lookup(username)
        return entry.scram if entry else None

    def fake_scram_credentials(self, username: str) -> ScramCredentials:
        """For an unknown user: a salt that is stable per username (for this
        process), so server-first-message does not reveal that the user does
        not exist (RFC 5802 §9); the proof then simply fails."""
        seed = hmac.digest(self._fake_secret, normalize_username(username).encode(), "sha256")
        return ScramCredentials(
            salt=seed[:16],
            iterations=self._iterations,
            stored_key=hmac.digest(seed, b"stored", "sha256"),
            server_key=hmac.digest(seed, b"server", "sha256"),
        )

    def users(self) -> list[tuple[Account, str, str]]:
        """(account, created, updated) for every user, sorted by username."""
        self._reload(force=True)
        return [
            (e.account, e.created, e.updated)
            for _, e in sorted(self._entries.items(), key=lambda kv: kv[0])
        ]

    # -- editing -----------------------------------------------------------------------
    def add(self, username: str, password: str, addresses: Sequence[str] = ()) -> Account:
        name = check_username(username)
        addrs = tuple(dict.fromkeys(check_address(a) for a in (addresses or (name,))))
        hashes = self._hash(password)
        with self._transaction() as users:
            if name in users:
                raise AccountExists(f"user {name} already exists (use `passwd` to change it)")
            now = _now_iso()
            users[name] = {"addresses": list(addrs), **hashes, "created": now, "updated": now}
        return Account(name, addrs)

    def set_password(self, username: str, password: str) -> None:
        name = normalize_username(username)
        hashes = self._hash(password)
        with self._transaction() as users:
            if name not in users:
                raise NoSuchAccount(f"no user {name}")
            users[name].update(hashes, updated=_now_iso())

    def delete(self, username: str) -> None:
        name = normalize_username(username)
        with self._transaction() as users:
            if name not in users:
                raise NoSuchAccount(f"no user {name}")
            del users[name]

    def _hash(self, password: str) -> dict[str, Any]:
        if not password:
            raise AccountError("password must not be empty")
        secret = saslprep(password).encode("utf-8")
        if len(secret) > MAX_PASSWORD:
            raise AccountError(f"password is longer than {MAX_PASSWORD} bytes")
        salt = secrets.token_bytes(16)
        scram_salt = secrets.token_bytes(16)
        scram = scram_sha256_credentials(password, scram_salt, self._iterations)
        return {
            "scrypt": {
                "n": self._n,
                "r": self._r,
                "p": self._p,
                "salt": _b64(salt),
                "hash": _b64(scrypt_hash(secret, salt, self._n, self._r, self._p)),
            },
            "scram-sha-256": {
                "salt": _b64(scram.salt),
                "iterations": scram.iterations,
                "stored_key": _b64(scram.stored_key),
                "server_key": _b64(scram.server_key),
            },
        }

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, dict[str, Any]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        # Root (``postillon user add``) locks here in the server user's directory:
        # never through a link planted in the lock's place, and never a file that is
        # also linked elsewhere, since the lock is then given to that user.
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AccountError(f"{lock_path}: cannot open the lock file ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise AccountError(f"{lock_path}: not a plain file of its own; remove it")
            _give_to_dir_owner(fd, self.path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
            users = self._read_raw()  # raises rather than overwrite a damaged file
            yield users
            payload = {"version": FILE_VERSION, "users": dict(sorted(users.items()))}
            write_atomic(self.path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
        finally:
            os.close(fd)  # releases the flock
        self._reload(force=True)


def _parse_entry(name: str, item: dict[str, Any]) -> _Entry:
    """One user's record; KeyError/ValueError/TypeError when it is damaged."""
    s = item["scrypt"]
    c = item["scram-sha-256"]
    addresses = tuple(str(a) for a in item.get("addresses") or (normalize_username(name),))
    return _Entry(
        account=Account(normalize_username(name), addresses),
        scrypt=_Scrypt(int(s["n"]), int(s["r"]), int(s["p"]), _unb64(s["salt"]), _unb64(s["hash"])),
        scram=ScramCredentials(
            salt=_unb64(c["salt"]),
            iterations=int(c["iterations"]),
            stored_key=_unb64(c["stored_key"]),
            server_key=_unb64(c["server_key"]),
        ),
        created=str(item.get("created", "")),
        updated=str(item.get("updated", "")),
    )


def _give_to_dir_owner(fd: int, directory: Path) -> None:
    """As root, hand a file to the owner of its directory (the server's user
    after privilege drop owns data_dir); otherwise leave it alone."""
    if os.geteuid() != 0:
        return
    st = os.stat(directory)
    os.fchown(fd, st.st_uid, st.st_gid)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """tmp in the same directory → write → fsync → rename → fsync the directory
    (``osutil.safeio``); as root, the file goes to the directory's owner first."""
    owner = None
    if os.geteuid() == 0:
        st = os.stat(path.parent)
        owner = (st.st_uid, st.st_gid)
    write_file(path, data, mode, owner)


def accounts_path(data_dir: Path, accounts_file: Path | None) -> Path:
    """``[submission] accounts_file``, else ``<data_dir>/accounts.json``."""
    return accounts_file if accounts_file is not None else data_dir / ACCOUNTS_FILE
