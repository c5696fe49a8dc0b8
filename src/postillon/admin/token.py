"""The admin token: generated once, shown once, stored only as a hash.

A token is 32 random bytes (URL-safe base64). The file keeps its SHA-256 and
when it was made; comparing hashes with ``hmac.compare_digest`` keeps the
check constant-time. A slow password hash would add nothing: the token is not
something a person chose, so there is no dictionary to try.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from postillon.osutil.safeio import write_file

TOKEN_FILE = "admin-token.json"


def token_path(data_dir: Path) -> Path:
    return data_dir / TOKEN_FILE


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token(path: Path, owner: tuple[int, int] | None = None) -> str:
    """Make a new token, store its hash durably (0600), return the token itself.

    ``owner`` (uid, gid): who the file is given to, for ``postillon admin token`` run
    as root while the server runs as its own user and must read the file. The file
    is written under a fresh name and renamed (osutil/safeio.py): a link the server's
    user planted in data_dir is replaced, never written through."""
    token = secrets.token_urlsafe(32)
    record = {"sha256": _digest(token), "created": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, json.dumps(record).encode("utf-8"), 0o600, owner)
    return token


@dataclass
class TokenVerifier:
    """Checks bearer tokens against the stored hash, re-reading the file when it changes."""

    path: Path
    _mtime: float | None = None
    _digest: str | None = None

    def _load(self) -> str | None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._mtime, self._digest = None, None
            return None
        if mtime != self._mtime:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                digest = str(data["sha256"])
            except (OSError, ValueError, KeyError, TypeError):
                digest = None  # a damaged file lets nobody in
            self._mtime, self._digest = mtime, digest
        return self._digest

    @property
    def configured(self) -> bool:
        return self._load() is not None

    def check(self, token: str) -> bool:
        stored = self._load()
        if stored is None or not token:
            return False
        return hmac.compare_digest(stored, _digest(token))
