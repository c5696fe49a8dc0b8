"""SPF, DKIM, DMARC and ARC at end of data (``authentication.py``) as a pipeline check.

On MX (``smtp``) listeners with ``[authentication] enabled``. Authenticated clients
and ``[relay] trusted_networks`` (unless ``check_trusted_networks``) are not checked,
but their messages lose any ``Authentication-Results:`` claiming to be ours. A
checked message gets the new ``Authentication-Results:`` (and an ARC set when an alias
forwards it off-server) on top; a DMARC/SPF policy may refuse it
(``auth_policy.py``). The whole message is read into memory only inside a
verification slot (bounded; ``VERIFY_BUSY`` after ``verify_wait``), and only up to
``max_arc_size``; a larger one is DKIM-verified streaming from the spool.
"""

from __future__ import annotations

from postillon.checks.authentication import (
    VERIFY_BUSY,
    InboundAuthentication,
    MessageFacts,
    VerifyBusy,
)
from postillon.checks.authresults import strip_own_results
from postillon.checks.base import BaseCheck
from postillon.checks.context import ListenerKind, MessageView, SessionContext, TransactionContext
from postillon.checks.decision import (
    CONTINUE,
    AddRawFields,
    Change,
    Decision,
    Phase,
    SetHeaderSection,
    proceed,
    reject,
)
from postillon.checks.parts import PipelineParts
from postillon.observability.maillog import MailLog


class AuthenticationCheck(BaseCheck):
    name = "authentication"
    phases: frozenset[Phase] = frozenset({"end_of_data"})

    def __init__(self, checks: InboundAuthentication, maillog: MailLog) -> None:
        self.checks = checks
        self.maillog = maillog

    async def end_of_data(
        self, s: SessionContext, tx: TransactionContext, message: MessageView
    ) -> Decision:
        checks = self.checks
        client = s.client
        if client.authenticated or (client.trusted and not checks.config.check_trusted_networks):
            # Our own senders are not checked, but may not forge our verdicts either.
            header, removed = strip_own_results(message.header, checks.authserv_id)
            why = "authenticated client" if client.authenticated else "trusted network"
            if not removed:
                return proceed(f"not checked: {why}")
            saw = f"not checked: {why}; removed {removed} forged Authentication-Results"
            return proceed(saw, SetHeaderSection(header))
        too_big = message.size > checks.config.max_verify_size
        whole = not too_big and message.size <= checks.config.max_arc_size
        try:
            # The message is read into memory only once it has a slot, and only up to
            # max_arc_size; above it DKIM hashes the body from the spool in chunks.
            async with checks.verify_slot():
                facts = MessageFacts(
                    client_ip=client.ip,
                    helo=client.helo,
                    mail_from=tx.sender,
                    header=message.header,
                    message=message.message_bytes() if whole else None,
                    recipients=[(t, r.address) for r in tx.recipients for t in r.targets],
                    body=None if whole or too_big else message.body_chunks,
                )
                verdict = await checks.evaluate(facts)
        except VerifyBusy:
            return reject(VERIFY_BUSY, "no verification slot free", metric="local_error")
        summary = verdict.summary()
        log_fields = {"results": summary, "action": verdict.decision.action}
        if verdict.decision.reason:
            log_fields["reason"] = verdict.decision.reason
        self.maillog.event("authentication", tx.queue_id, **log_fields)
        saw = f"{summary}; policy: {verdict.decision.action}"
        if verdict.decision.reason:
            saw += f" ({verdict.decision.reason})"
        if verdict.decision.reply is not None:
            return reject(verdict.decision.reply, saw, metric="authentication")
        changes: list[Change] = []
        if verdict.header != message.header:
            changes.append(SetHeaderSection(verdict.header))
        if verdict.prepend:
            changes.append(AddRawFields(verdict.prepend))
        return proceed(saw, *changes) if changes else (proceed(saw) if saw else CONTINUE)


def build(kind: ListenerKind, parts: PipelineParts) -> AuthenticationCheck | None:
    # Inbound checks on MX (smtp) listeners only, never submission or LMTP.
    if kind != "smtp" or parts.authentication is None:
        return None
    return AuthenticationCheck(parts.authentication, parts.maillog)
