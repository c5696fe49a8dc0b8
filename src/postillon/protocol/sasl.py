"""SASL mechanisms for SMTP AUTH (RFC 4954, RFC 4422), server side, without I/O.

Design note (two minutes)
-------------------------
Each mechanism is a small state machine. ``start(initial_response)`` and
``respond(data)`` take what the client sent (already base64-decoded; the
initial response is ``None`` when the AUTH command had none) and return one
``Step``:

* ``Challenge(data)`` - send ``334 base64(data)``; the client's next line goes
  to ``respond``.
* ``CheckPassword(username, password, authzid)`` - PLAIN and LOGIN are done;
  whoever holds the credential store says yes or no.
* ``NeedScramCredentials(username, authzid)`` - SCRAM needs the user's stored
  keys: call ``credentials(creds or None)``, which returns the next step (the
  server-first message as a ``Challenge``). An unknown user gets a made-up
  salt, so the exchange looks the same and fails at the proof (RFC 5802 §9).
* ``ScramVerdict(username, authzid, valid, server_final)`` - the client's
  proof is checked. When the server accepts, it sends ``server_final`` in a
  334 and the client answers with an empty line, which gives ``Success``
  (RFC 4954 §4: additional data with a successful outcome).

Malformed input raises ``SaslError`` (the server answers 501 5.5.2).

protocol/ imports no hashing library (its purity rule), so SCRAM gets SHA-256,
HMAC-SHA-256 and its nonce source from the adapter (``ScramPrimitives``);
base64 (an encoding, not cryptography) is done here.

SASLprep (RFC 4013) is not done here but where credentials are checked: the
mechanisms pass on the UTF-8 the client sent, and ``inbound/accounts.py``
SASLpreps passwords before both of its hashes (the PLAIN/LOGIN check and the
stored SCRAM keys, whose client side SASLpreps too, RFC 5802 §2.2), so PLAIN
and SCRAM agree on a non-ASCII password. Usernames are compared after
``strip().lower()``, not SASLprep.

Not done: SCRAM-SHA-256-PLUS (channel binding ``tls-exporter``, RFC
9266) needs the TLS exporter, and Python 3.11's ``ssl`` has no API for it
(no ``export_keying_material``; ``tls-unique`` does not exist for TLS 1.3), so
-PLUS is never offered and a client that asks for binding (``p=``) fails.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from postillon.core.account import ScramCredentials

__all__ = [
    "MECHANISMS",
    "Challenge",
    "CheckPassword",
    "Login",
    "Mechanism",
    "NeedScramCredentials",
    "Plain",
    "SaslError",
    "ScramPrimitives",
    "ScramSha256",
    "ScramVerdict",
    "Step",
    "Success",
    "b64decode",
    "b64encode",
]

MECHANISMS = ("PLAIN", "LOGIN", "SCRAM-SHA-256")  # what the server core can run
SCRAM_UNKNOWN_ITERATIONS = 4096  # RFC 7677 §4: at least 4096 (the made-up answer)


class SaslError(Exception):
    """The client's SASL message is malformed (the server answers 501 5.5.2)."""


# --- base64 (RFC 4648 §4), strict --------------------------------------------------

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_VALUE = {c: i for i, c in enumerate(_ALPHABET)}
_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")


def b64encode(data: bytes) -> str:
    out: list[str] = []
    for i in range(0, len(data), 3):
        chunk = data[i : i + 3]
        n = int.from_bytes(chunk.ljust(3, b"\0"), "big")
        quad = "".join(_ALPHABET[(n >> s) & 63] for s in (18, 12, 6, 0))
        out.append(quad[: len(chunk) + 1] + "=" * (3 - len(chunk)))
    return "".join(out)


def b64decode(text: str) -> bytes:
    """Strict base64: the alphabet, padding and length are checked; SaslError otherwise."""
    if not _B64.match(text):
        raise SaslError("invalid base64")
    out = bytearray()
    for i in range(0, len(text), 4):
        quad = text[i : i + 4]
        pad = quad.count("=")
        n = 0
        for c in quad:
            n = (n << 6) | _VALUE.get(c, 0)
        chunk = n.to_bytes(3, "big")[: 3 - pad]
        if pad and n & (0xFF if pad == 1 else 0xFFFF):
            raise SaslError("invalid base64 (non-zero pad bits)")
        out += chunk
    return bytes(out)


# --- steps ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes


@dataclass(frozen=True, slots=True)
class CheckPassword:
    username: str
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class NeedScramCredentials:
    username: str
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class ScramVerdict:
    username: str
    authzid: str
    valid: bool
    server_final: bytes


@dataclass(frozen=True, slots=True)
class Success:
    """The exchange is over and the server accepted it (after ``ScramVerdict``)."""


Step = Challenge | CheckPassword | NeedScramCredentials | ScramVerdict | Success


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not UTF-8") from None


class Mechanism(ABC):
    """One server-side SASL exchange. Not reusable."""

    name = ""

    @abstractmethod
    def start(self, initial: bytes | None) -> Step: ...

    @abstractmethod
    def respond(self, data: bytes) -> Step: ...

    def credentials(self, creds: ScramCredentials | None) -> Step:
        raise RuntimeError(f"{self.name} does not take SCRAM credentials")


class Plain(Mechanism):
    """RFC 4616: ``[authzid] NUL authcid NUL passwd`` in one message."""

    name = "PLAIN"

    def __init__(self) -> None:
        self._done = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        if self._done:
            raise SaslError("PLAIN has one message")
        self._done = True
        parts = data.split(b"\0")
        if len(parts) != 3:
            raise SaslError("PLAIN message needs exactly two NULs")
        authzid, authcid, passwd = (_utf8(p, "PLAIN field") for p in parts)
        if not authcid or not passwd or len(authcid) > 255 or len(passwd) > 255:
            raise SaslError("PLAIN authcid and passwd are 1 to 255 characters")
        return CheckPassword(authcid, passwd, authzid)


class Login(Mechanism):
    """The LOGIN mechanism (draft-murchison-sasl-login): username, then password.

    An initial response, when given, is the username (as Outlook and swaks send it).
    """

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None
        self._done = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        if self._done:
            raise SaslError("LOGIN is over")
        text = _utf8(data, "LOGIN field")
        if not text or len(text) > 255:
            raise SaslError("LOGIN fields are 1 to 255 characters")
        if self._username is None:
            self._username = text
            return Challenge(b"Password:")
        self._done = True
        return CheckPassword(self._username, text)


# --- SCRAM-SHA-256 (RFC 5802, RFC 7677) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScramPrimitives:
    """What SCRAM needs from outside the pure core.

    ``sha256(data)``, ``hmac_sha256(key, data)``; ``nonce()`` returns the
    server's nonce part (printable ASCII without ``,``; at least 18 random
    octets' worth); ``fake_salt(username)`` a stable salt for unknown users.
    """

    sha256: Callable[[bytes], bytes]
    hmac_sha256: Callable[[bytes, bytes], bytes]
    nonce: Callable[[], str]
    fake_salt: Callable[[str], bytes]


_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+\Z")  # RFC 5802 printable: no ","
_EXTENSION = re.compile(r"[A-Za-z]=")  # RFC 5802 attr-val (optional extensions)
_SASLNAME = re.compile(r"(?:[^,=]|=2C|=3D)+\Z")


def _saslname(value: str) -> str:
    if not _SASLNAME.match(value):
        raise SaslError("bad saslname")
    return value.replace("=2C", ",").replace("=3D", "=")


def _equal(a: bytes, b: bytes) -> bool:
    """Comparison whose time does not depend on where the inputs differ."""
    if len(a) != len(b):
        return False
    diff = 0
    for x, y in zip(a, b, strict=True):
        diff |= x ^ y
    return diff == 0


class ScramSha256(Mechanism):
    """SCRAM-SHA-256, server side, without channel binding (see the module note)."""

    name = "SCRAM-SHA-256"

    def __init__(self, primitives: ScramPrimitives) -> None:
        self._p = primitives
        self._stage = "first"
        self._gs2_header = ""
        self._client_first_bare = ""
        self._client_nonce = ""
        self._username = ""
        self._authzid = ""
        self._server_first = ""
        self._nonce = ""
        self._creds: ScramCredentials | None = None
        self._known = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        stage = self._stage
        if stage == "first":
            return self._client_first(_utf8(data, "client-first-message"))
        if stage == "final":
            return self._client_final(_utf8(data, "client-final-message"))
        if stage == "verified":
            if data:
                raise SaslError("expected an empty response after server-final-message")
            self._stage = "done"
            return Success()
        raise SaslError(f"unexpected SCRAM message in stage {stage}")

    def _client_first(self, text: str) -> Step:
        # gs2-header: gs2-cbind-flag "," [ authzid ] ","
        flag, _, rest = text.partition(",")
        authz, _, bare = rest.partition(",")
        if flag.startswith("p="):
            raise SaslError("channel binding requested but -PLUS is not offered")
        if flag not in ("n", "y") or not bare:
            raise SaslError("bad gs2-header")
        if authz:
            if not authz.startswith("a="):
                raise SaslError("bad authzid in gs2-header")
            self._authzid = _saslname(authz[2:])
        attrs = bare.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            raise SaslError("client-first-message needs n= and r=")
        if any(a.startswith("m=") for a in attrs[2:]):
            raise SaslError("mandatory extension not supported")
        if not all(_EXTENSION.match(a) for a in attrs[2:]):
            raise SaslError("bad attribute in client-first-message")
        self._username = _saslname(attrs[0][2:])
        self._client_nonce = attrs[1][2:]
        if not _PRINTABLE.match(self._client_nonce):
            raise SaslError("bad client nonce")
        self._gs2_header = f"{flag},{authz},"
        self._client_first_bare = bare
        self._stage = "credentials"
        return NeedScramCredentials(self._username, self._authzid)

    def credentials(self, creds: ScramCredentials | None) -> Step:
        if self._stage != "credentials":
            raise RuntimeError("SCRAM credentials are not awaited now")
        server_nonce = self._p.nonce()
        if not _PRINTABLE.match(server_nonce):
            raise RuntimeError("the SCRAM nonce source must give printable text without ','")
        self._known = creds is not None
        if creds is None:  # an unknown user: the same dialogue, then a failed proof
            creds = ScramCredentials(
                self._p.fake_salt(self._username), SCRAM_UNKNOWN_ITERATIONS, b"", b""
            )
        self._creds = creds
        self._nonce = self._client_nonce + server_nonce
        salt = b64encode(creds.salt)
        self._server_first = f"r={self._nonce},s={salt},i={creds.iterations}"
        self._stage = "final"
        return Challenge(self._server_first.encode("ascii"))

    def _client_final(self, text: str) -> Step:
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise SaslError("client-final-message needs p=")
        attrs = without_proof.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("c=") or not attrs[1].startswith("r="):
            raise SaslError("client-final-message needs c= and r=")
        proof = b64decode(proof_b64)
        binding = b64decode(attrs[0][2:])
        creds = self._creds
        assert creds is not None
        p = self._p
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        client_signature = p.hmac_sha256(creds.stored_key, auth_message.encode("utf-8"))
        valid = (
            self._known
            and binding == self._gs2_header.encode("utf-8")
            and attrs[1][2:] == self._nonce
            and len(proof) == len(client_signature)
        )
        if valid:
            client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
            valid = _equal(p.sha256(client_key), creds.stored_key)
        server_final = b""
        if valid:
            signature = p.hmac_sha256(creds.server_key, auth_message.encode("utf-8"))
            server_final = ("v=" + b64encode(signature)).encode("ascii")
            self._stage = "verified"
        else:
            self._stage = "failed"
        return ScramVerdict(self._username, self._authzid, valid, server_final)
