"""Postfix policy delegation (SMTPD_POLICY_README) as a pipeline check: ``[[policy_service]]``.

Existing policy servers (postgrey, policyd-spf, postfwd, ...) plug in unchanged: at the
configured ``phase`` (``rcpt`` by default, Postfix's ``check_policy_service`` place) the
check sends the Postfix attributes of the session and transaction (``request``,
``protocol_state``, ``client_address``, ``helo_name``, ``sender``, ``recipient``, ...)
and acts on the ``action=`` answer (``protocol/policy_delegation.py`` parses both, sans-IO):

=========================================  ===========================================
DUNNO, OK, INFO, WARN                      go on (WARN/INFO are logged)
REJECT text, DEFER text, DEFER_IF_PERMIT   554 5.7.1 / 450 4.7.1 with the text
4NN/5NN [d.d.d] text                       that reply (x.7.1 unless the text has one)
PREPEND Name: value                        the field on top of the message
DISCARD / HOLD                             drop the message (250) / quarantine it
REDIRECT, FILTER, BCC, DEFER_IF_REJECT     not supported: logged, go on
=========================================  ===========================================

Connections are kept and reused (one request at a time on each, as Postfix does); a
reused connection the server closed meanwhile is retried once on a new one. A server
that is down, slower than ``timeout`` seconds, or answers garbage leads to
``default_action`` (``tempfail`` = 451 4.3.0, ``accept``, ``reject`` = 550 5.7.1), never
a hang: every wait has the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from postillon.checks.base import BaseCheck
from postillon.checks.context import (
    ListenerKind,
    MessageView,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import (
    AddHeader,
    Decision,
    Phase,
    discard,
    proceed,
    quarantine,
    reject,
)
from postillon.checks.parts import PipelineParts
from postillon.config.inbound_filters import PolicyServiceConfig
from postillon.core.reply import TEMP_LOCAL_ERROR, Reply
from postillon.protocol.policy_delegation import (
    PolicyProtocolError,
    PolicyResponse,
    ResponseReader,
    encode_request,
    parse_action,
)

__all__ = ["PolicyServiceCheck", "PolicyServiceClient", "build_all"]

log = logging.getLogger("postillon.checks.policy_service")

DEFAULT_REJECT = Reply.of(550, "5.7.1", "Access denied")
_PROTOCOL_STATE = {"mail": "MAIL", "rcpt": "RCPT", "data": "DATA", "end_of_data": "END-OF-MESSAGE"}
_MAX_IDLE = 8  # kept connections per policy server


class PolicyServiceError(Exception):
    """The policy server could not be asked (down, slow, garbage): the default applies."""


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class PolicyServiceClient:
    """Asks one policy server; the asyncio adapter of ``protocol.policy_delegation``."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        kind, _, rest = self.address.partition(":")
        if kind == "unix":
            return await asyncio.open_unix_connection(rest, limit=65536)
        host, _, port = rest.rpartition(":")
        return await asyncio.open_connection(host.strip("[]"), int(port), limit=65536)

    async def ask(self, attributes: dict[str, str]) -> PolicyResponse:
        request = encode_request(attributes)
        try:
            async with asyncio.timeout(self.timeout):
                while self._idle:
                    conn = self._idle.pop()
                    try:
                        return await self._exchange(conn, request)
                    except _StaleConnection:
                        continue  # closed by the server while idle: a fresh one
                conn = await self._connect()
                try:
                    return await self._exchange(conn, request)
                except _StaleConnection as exc:
                    raise PolicyServiceError("the policy server closed the connection") from exc
        except TimeoutError:
            raise PolicyServiceError(f"no answer within {self.timeout:g}s") from None
        except OSError as exc:
            raise PolicyServiceError(f"cannot reach {self.address}: {exc}") from exc
        except PolicyProtocolError as exc:
            raise PolicyServiceError(f"bad answer: {exc}") from exc

    async def _exchange(self, conn: _Conn, request: bytes) -> PolicyResponse:
        reader, writer = conn
        parser = ResponseReader()
        done = False
        try:
            writer.write(request)
            await writer.drain()
            while True:
                data = await reader.read(65536)
                if not data:
                    if parser.pending:
                        raise PolicyProtocolError("connection closed mid-answer")
                    raise _StaleConnection
                parser.receive_data(data)
                response = parser.next_response()
                if response is not None:
                    if parser.pending or parser.next_response() is not None:
                        raise PolicyProtocolError("more than one answer to one request")
                    done = True
                    return response
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _StaleConnection from exc
        finally:
            if done and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
            else:
                writer.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _StaleConnection(Exception):
    """The server closed the connection before answering (idle timeout on its side)."""


class PolicyServiceCheck(BaseCheck):
    def __init__(self, config: PolicyServiceConfig, client: PolicyServiceClient) -> None:
        self.config = config
        self.client = client
        self.name = f"policy:{config.name}"
        # end_of_data too: a PREPEND answered at an earlier phase goes on the message then.
        self.phases: frozenset[Phase] = frozenset({config.phase, "end_of_data"})

    def _attributes(
        self,
        s: SessionContext,
        tx: TransactionContext,
        phase: Phase,
        recipient: str = "",
        size: int = 0,
    ) -> dict[str, str]:
        c = s.client
        return {
            "request": "smtpd_access_policy",
            "protocol_state": _PROTOCOL_STATE[phase],
            "protocol_name": "ESMTP" if c.esmtp else "SMTP",
            "client_address": c.ip,
            "client_name": c.rdns or "unknown",
            "reverse_client_name": c.rdns or "unknown",
            "client_port": str(c.port),
            "helo_name": c.helo,
            "sender": tx.sender,
            "recipient": recipient,
            "recipient_count": str(len(tx.recipients)) if phase != "rcpt" else "0",
            "queue_id": tx.queue_id,
            "instance": f"{s.session_id}.{tx.queue_id}",
            "size": str(size or (tx.params.size if tx.params and tx.params.size else 0)),
            "sasl_method": "",
            "sasl_username": c.username if c.authenticated else "",
            "sasl_sender": "",
            "encryption_protocol": c.tls_version,
            "encryption_cipher": c.tls_cipher,
            "policy_context": self.config.name,
        }

    async def _ask(
        self, s: SessionContext, tx: TransactionContext, phase: Phase, **extra: str | int
    ) -> Decision:
        attributes = self._attributes(s, tx, phase, **extra)  # type: ignore[arg-type]
        try:
            response = await self.client.ask(attributes)
        except PolicyServiceError as exc:
            return self._default(str(exc))
        action = parse_action(response.action)
        saw = f"{self.config.address} answered action={response.action[:200]}"
        if action.kind == "reply":
            assert action.reply is not None
            return reject(action.reply, saw, metric="policy_service")
        if action.kind == "prepend":
            name, _, value = action.text.partition(":")
            pending: dict[int, list[AddHeader]] = s.state.setdefault(self.name, {})
            pending.setdefault(id(tx), []).append(AddHeader(name.strip(), value.strip()))
            return proceed(saw)
        if action.kind == "discard":
            return discard(saw, reason=action.text or f"discarded by {self.name}")
        if action.kind == "hold":
            return quarantine(action.text or f"held by {self.name}", saw)
        if action.kind == "unsupported":
            log.warning("%s: action not supported, ignored: %s", self.name, action.text[:200])
        elif action.kind in ("warn", "info"):
            log.info("%s: %s %s", self.name, action.kind.upper(), action.text[:200])
        return proceed(saw)

    def _default(self, problem: str) -> Decision:
        log.warning("%s (%s): %s; default_action %s", self.name, self.config.address, problem,
                    self.config.default_action)  # fmt: skip
        saw = (
            f"policy server {self.config.address}: {problem}; default {self.config.default_action}"
        )
        if self.config.default_action == "accept":
            return proceed(saw)
        reply = TEMP_LOCAL_ERROR if self.config.default_action == "tempfail" else DEFAULT_REJECT
        return reject(reply, saw, reason=f"{self.name}: {problem}", metric="policy_service")

    async def mail(self, s: SessionContext, tx: TransactionContext) -> Decision:
        return await self._ask(s, tx, "mail")

    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Decision:
        return await self._ask(s, tx, "rcpt", recipient=rcpt.address)

    async def data(self, s: SessionContext, tx: TransactionContext) -> Decision:
        return await self._ask(s, tx, "data")

    async def end_of_data(
        self, s: SessionContext, tx: TransactionContext, message: MessageView
    ) -> Decision:
        pending: dict[int, list[AddHeader]] = s.state.setdefault(self.name, {})
        earlier = tuple(pending.pop(id(tx), ()))
        if self.config.phase != "end_of_data":
            return proceed(f"{len(earlier)} field(s) prepended", *earlier) if earlier else proceed()
        decision = await self._ask(s, tx, "end_of_data", size=message.size)
        now = tuple(pending.pop(id(tx), ()))
        if decision.action == "reject" or not (earlier or now):
            return decision
        return Decision(
            decision.action,
            saw=decision.saw,
            reason=decision.reason,
            changes=(*earlier, *now),
        )

    async def reset(self, s: SessionContext, tx: TransactionContext) -> None:
        s.state.get(self.name, {}).pop(id(tx), None)

    async def close(self, s: SessionContext) -> None:
        s.state.pop(self.name, None)


def build_all(kind: ListenerKind, parts: PipelineParts) -> list[PolicyServiceCheck]:
    """One check per ``[[policy_service]]`` that serves this listener kind, in order."""
    return [
        PolicyServiceCheck(c, PolicyServiceClient(c.address, c.timeout))
        for c in parts.config.policy_service
        if kind in c.listeners
    ]
