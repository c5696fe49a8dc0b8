"""AUTH on the server side: the command, the SASL exchange, and the adapter's answers.

The part of ``ServerConnection`` that runs ``AUTH mechanism [initial-response]``
(RFC 4954): it drives a ``sasl.Mechanism`` line by line in the AUTH state,
turns each ``sasl.Step`` into a 334 challenge or a decision event
(``AuthPassword``, ``AuthScramLookup``, ``AuthProof``), and takes the adapter's
answer (``auth_accept()``, ``auth_credentials()``; refusals go through
``reply()``). A mixin, so the connection keeps one output buffer, one event
queue and one state; the attributes it uses are declared below and set by
``ServerConnection``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from postillon.core.account import ScramCredentials
from postillon.core.reply import Reply
from postillon.protocol import replies as R
from postillon.protocol._state import Command, State, Trigger, transition
from postillon.protocol.errors import ProtocolError
from postillon.protocol.events import (
    AuthAborted,
    Authenticated,
    AuthPassword,
    AuthProof,
    AuthScramLookup,
    Decision,
    Event,
)
from postillon.protocol.sasl import (
    Challenge,
    CheckPassword,
    Mechanism,
    NeedScramCredentials,
    SaslError,
    ScramVerdict,
    Step,
    Success,
    b64decode,
    b64encode,
)
from postillon.protocol.settings import ServerSettings

__all__ = ["AuthExchange"]


class AuthExchange:
    """Mixin of ``ServerConnection``: AUTH and the SASL exchange."""

    # Set by ServerConnection.__init__.
    settings: ServerSettings
    closing: bool
    _mechanisms: Mapping[str, Callable[[], Mechanism]]
    _authenticated: bool
    _auth: Mechanism | None
    _auth_name: str
    _auth_final: bytes
    _auth_user: tuple[str, str]
    _state: State
    _out: bytearray
    _events: deque[Event]
    _pending: Decision | None

    if TYPE_CHECKING:  # provided by ServerConnection

        @property
        def auth_offered(self) -> bool: ...

        def _check(self, command: Command) -> None: ...

        def _send(self, reply: Reply) -> None: ...

    # --- the adapter's answers ---------------------------------------------------

    def auth_accept(self) -> None:
        """Say yes to a pending ``AuthPassword``, or to an ``AuthProof`` that is valid."""
        event = self._pending
        if isinstance(event, AuthProof) and event.valid:
            self._pending = None
            self._send_challenge(self._auth_final)  # the client answers with an empty line
        elif isinstance(event, AuthPassword):
            self._pending = None
            self._auth_success()
        else:
            raise RuntimeError("auth_accept() answers AuthPassword or a valid AuthProof only")

    def auth_credentials(self, creds: ScramCredentials | None) -> None:
        """Answer ``AuthScramLookup``: the user's stored SCRAM keys, or None if unknown."""
        event = self._pending
        mech = self._auth
        if not isinstance(event, AuthScramLookup) or mech is None:
            raise RuntimeError("auth_credentials() answers a pending AuthScramLookup only")
        self._pending = None
        self._auth_step(mech.credentials(creds))

    # --- the AUTH command ----------------------------------------------------------

    def _cmd_auth(self, verb: str, args: str) -> None:
        """``AUTH mechanism [initial-response]`` (RFC 4954 §4)."""
        mechanisms = self.settings.auth_mechanisms
        if not mechanisms:
            raise ProtocolError(R.NOT_IMPLEMENTED)
        if not self.auth_offered:
            raise ProtocolError(R.AUTH_ENCRYPTION_REQUIRED)
        if self._authenticated:
            raise ProtocolError(R.AUTH_ALREADY)
        self._check(Command.AUTH)
        words = args.split(" ")
        if not words[0] or len(words) > 2:
            raise ProtocolError(R.PARAM_SYNTAX)
        name = words[0].upper()
        if name not in mechanisms:
            raise ProtocolError(R.AUTH_UNKNOWN_MECHANISM)
        initial: bytes | None = None
        if len(words) == 2:
            try:  # "=" is an empty initial response
                initial = b"" if words[1] == "=" else b64decode(words[1])
            except SaslError:
                raise ProtocolError(R.AUTH_MALFORMED) from None
        mech = self._mechanisms[name]()
        try:
            step = mech.start(initial)
        except SaslError:
            raise ProtocolError(R.AUTH_MALFORMED) from None
        self._auth = mech
        self._auth_name = name
        self._state = transition(self._state, Trigger.AUTH_STARTED)
        self._auth_step(step)

    # --- the SASL exchange ---------------------------------------------------------

    def _auth_line(self, raw: bytes) -> None:
        """One client response inside AUTH: base64, or "*" to cancel."""
        mech = self._auth
        assert mech is not None
        if raw == b"*":
            self._auth_abort(R.AUTH_CANCELLED)
            return
        try:
            step = mech.respond(b64decode(raw.decode("ascii")))
        except (SaslError, UnicodeDecodeError):
            self._auth_abort(R.AUTH_MALFORMED)
            return
        self._auth_step(step)

    def _auth_step(self, step: Step) -> None:
        name = self._auth_name
        if isinstance(step, Challenge):
            self._send_challenge(step.data)
        elif isinstance(step, CheckPassword):
            self._auth_user = (step.username, step.authzid)
            self._events.append(AuthPassword(name, step.username, step.authzid, step.password))
        elif isinstance(step, NeedScramCredentials):
            self._events.append(AuthScramLookup(name, step.username, step.authzid))
        elif isinstance(step, ScramVerdict):
            self._auth_final = step.server_final
            self._auth_user = (step.username, step.authzid)
            self._events.append(AuthProof(name, step.username, step.authzid, step.valid))
        elif isinstance(step, Success):
            self._auth_success()

    def _send_challenge(self, data: bytes) -> None:
        self._out += b"334 " + b64encode(data).encode("ascii") + b"\r\n"

    def _auth_success(self) -> None:
        self._send(R.AUTH_SUCCEEDED)
        self._authenticated = True
        self._events.append(Authenticated(self._auth_name, *self._auth_user))
        self._auth_end()

    def _auth_abort(self, reply: Reply) -> None:
        self._send(reply)
        self._events.append(AuthAborted(self._auth_name, reply))
        if not self.closing:
            self._auth_end()

    def _auth_end(self) -> None:
        self._auth = None
        self._auth_final = b""
        self._state = transition(self._state, Trigger.AUTH_DONE)
