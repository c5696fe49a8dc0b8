"""SMTP AUTH for submission (RFC 4954, RFC 6409): what the session needs beyond the core.

Design note (two minutes)
-------------------------
The SASL dialogue itself runs inside the sans-IO core (``protocol/sasl.py``
mechanisms driven by ``ServerConnection``); the core asks the session two
questions only - "is this password right?" (``AuthPassword``) and "what are
this user's SCRAM keys?" (``AuthScramLookup``) - and reports SCRAM's verdict
(``AuthProof``). ``Authenticator`` is what the session answers them with:

* the ``CredentialStore`` (``inbound/accounts.py``; the password check is a
  slow hash, so the session calls it in a thread);
* the hashing primitives and nonce source SCRAM needs (``hashlib``/``hmac``/
  ``secrets``, which the pure core may not import);
* ``AuthGuard``, the per-client failure budget shared by every session of the
  process (one instance per process, in memory, with an injected clock).

Failure budget (per IPv4 address, per IPv6 /64): every wrong password counts
within a sliding ``window``. From the ``delay_after``-th failure on, the 535
comes only after a delay that grows by ``delay_step`` per failure (up to
``max_delay``); at ``max_failures`` the client gets 421 4.7.0 and the
connection is closed, and every AUTH from that address is refused with 421
for ``block_for`` seconds, without looking at the password. Other addresses
are not affected, so a brute force from one address cannot lock a user out
(the attack is slowed per source, not per account).

An attempt is counted *before* its password is checked (``begin``), not only
after: checking "blocked?" first and counting the failure once the slow hash
(or the thread hop) is done let 30 parallel sessions get 30 guesses checked
where the budget is 10. So attempts in flight plus failures in the window may
not exceed ``max_failures``; a further attempt is refused unchecked
(``"busy"``, 454 4.7.0: it may try again once one in flight is settled).
``release`` gives a slot back (a success, or an exchange that never reached
a verdict); a failure is ``release`` then ``failure``, with no await between.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from postillon.core.account import CredentialStore, ScramCredentials
from postillon.core.client import client_key as ip_key
from postillon.core.clock import Clock, SystemClock
from postillon.inbound.accounts import scram_sha256_credentials
from postillon.protocol.sasl import Login, Plain, ScramPrimitives, ScramSha256
from postillon.protocol.server import MechanismFactory

# Offered in this order (strongest first) on submission listeners once TLS is up.
DEFAULT_MECHANISMS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")
MAX_TRACKED = 100_000  # client addresses remembered by AuthGuard (memory bound)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def scram_primitives(secret: bytes | None = None) -> ScramPrimitives:
    """SCRAM's hashing and randomness; ``secret`` keys the made-up salts of unknown users."""
    key = secret if secret is not None else secrets.token_bytes(32)
    return ScramPrimitives(
        sha256=_sha256,
        hmac_sha256=_hmac_sha256,
        nonce=lambda: secrets.token_urlsafe(24),  # 192 bits, no ","
        fake_salt=lambda username: _hmac_sha256(key, username.encode("utf-8"))[:16],
    )


def scram_credentials(password: str, salt: bytes, iterations: int = 4096) -> ScramCredentials:
    """RFC 5802 §3 stored keys for SCRAM-SHA-256 (RFC 7677: at least 4096 iterations);
    the account store's derivation, so what tests build is what the store keeps."""
    return scram_sha256_credentials(password, salt, iterations)


def mechanism_factories(primitives: ScramPrimitives) -> dict[str, MechanismFactory]:
    return {
        "PLAIN": Plain,
        "LOGIN": Login,
        "SCRAM-SHA-256": lambda: ScramSha256(primitives),
    }


@dataclass(frozen=True, slots=True)
class Penalty:
    """What a failure costs: wait ``delay`` seconds before answering; then
    535, or 421 and close when ``disconnect``. ``failures`` in the window so far."""

    failures: int
    delay: float
    disconnect: bool


class AuthGuard:
    """The per-client AUTH failure budget of one process (see the module note)."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        delay_after: int = 3,
        delay_step: float = 1.0,
        max_delay: float = 10.0,
        max_failures: int = 10,
        window: float = 600.0,
        block_for: float = 900.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_failures < 1 or delay_after < 0 or window <= 0:
            raise ValueError("max_failures >= 1, delay_after >= 0 and window > 0")
        self.clock = clock or SystemClock()
        self.delay_after = delay_after
        self.delay_step = delay_step
        self.max_delay = max_delay
        self.max_failures = max_failures
        self.window = window
        self.block_for = block_for
        self.sleep = sleep
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}

    def begin(self, ip: str) -> Literal["blocked", "busy"] | None:
        """Reserve one attempt for ``ip`` before its credentials are checked:
        None when reserved (settle it with ``release``, then ``failure`` if it
        failed); "blocked" after ``max_failures``; "busy" when the failures in
        the window plus the attempts in flight already use up the budget."""
        if self.blocked(ip):
            return "blocked"
        key = ip_key(ip)
        flying = self._in_flight.get(key, 0)
        if flying + self.failures(ip) >= self.max_failures:
            return "busy"
        self._in_flight[key] = flying + 1
        return None

    def release(self, ip: str) -> None:
        """Give back a slot taken by ``begin``."""
        key = ip_key(ip)
        flying = self._in_flight.get(key, 0) - 1
        if flying > 0:
            self._in_flight[key] = flying
        else:
            self._in_flight.pop(key, None)

    def in_flight(self, ip: str) -> int:
        return self._in_flight.get(ip_key(ip), 0)

    def blocked(self, ip: str) -> bool:
        key = ip_key(ip)
        until = self._blocked.get(key)
        if until is None:
            return False
        if self.clock.now() < until:
            return True
        del self._blocked[key]
        self._failures.pop(key, None)
        return False

    def failure(self, ip: str) -> Penalty:
        """Count one failed authentication from ``ip``."""
        key = ip_key(ip)
        now = self.clock.now()
        times = self._failures.pop(key, None) or deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        times.append(now)
        self._failures[key] = times  # re-inserted: the dict stays in recency order
        self._trim()
        count = len(times)
        if count >= self.max_failures:
            self._blocked[key] = now + self.block_for
            return Penalty(count, 0.0, True)
        over = count - self.delay_after
        delay = min(self.max_delay, self.delay_step * over) if over > 0 else 0.0
        return Penalty(count, delay, False)

    def failures(self, ip: str) -> int:
        times = self._failures.get(ip_key(ip))
        now = self.clock.now()
        return sum(1 for t in times if t > now - self.window) if times else 0

    def _trim(self) -> None:
        while len(self._failures) > MAX_TRACKED:
            del self._failures[next(iter(self._failures))]
        if len(self._blocked) > MAX_TRACKED:
            now = self.clock.now()
            for key in [k for k, until in self._blocked.items() if until <= now]:
                del self._blocked[key]


@dataclass(frozen=True, slots=True)
class Authenticator:
    """Everything a session needs to answer AUTH (``SessionDeps.auth``)."""

    store: CredentialStore
    guard: AuthGuard
    mechanisms: Mapping[str, MechanismFactory]

    @classmethod
    def create(cls, store: CredentialStore, guard: AuthGuard | None = None) -> Authenticator:
        return cls(store, guard or AuthGuard(), mechanism_factories(scram_primitives()))


_LOG_NAME = 64  # characters of a client-supplied username kept in the log


def loggable_name(name: str) -> str:
    """A username as the client typed it, safe for a log line."""
    short = name[:_LOG_NAME] + ("..." if len(name) > _LOG_NAME else "")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in short)
