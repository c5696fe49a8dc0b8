"""Accounts of users who submit mail (RFC 6409), as the AUTH code sees them.

The store (``inbound/accounts.py``) keeps them hashed on disk; SASL
mechanisms only see these values and the ``CredentialStore`` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Account:
    username: str
    addresses: tuple[str, ...]  # what the user may use in MAIL FROM and From:


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """RFC 5802 §3 stored credentials for one hash (SCRAM-SHA-256, RFC 7677)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


class CredentialStore(Protocol):
    def verify_password(self, username: str, password: str) -> Account | None:
        """Constant-time check; blocking (a slow hash), so call it from a thread."""
        ...

    def scram_credentials(self, username: str) -> ScramCredentials | None: ...

    def get(self, username: str) -> Account | None: ...
