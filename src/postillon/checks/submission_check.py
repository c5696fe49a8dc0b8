"""Submission policy (RFC 6409): a user sends only as itself, and only so fast.

``sender_policy.py`` decides sender ownership (MAIL FROM at mail, every ``From:`` at
end of data) for authenticated clients; ``rate_limit.py`` counts messages (at mail)
and recipients (at rcpt, after the relay check accepted them) per user and per
client IP, for every session of a submission listener and for authenticated
clients anywhere. Warnings (``sender_policy = "warn"``) go to the mail log.
"""

from __future__ import annotations

from collections.abc import Callable

from postillon.checks.base import BaseCheck
from postillon.checks.context import (
    ListenerKind,
    MessageView,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import CONTINUE, Decision, Phase, proceed, reject
from postillon.checks.parts import PipelineParts
from postillon.checks.rate_limit import SubmissionRateLimits
from postillon.checks.sender_policy import (
    SenderMode,
    check_from_header,
    check_mail_from,
    from_header_values,
)
from postillon.core.account import Account
from postillon.observability.maillog import MailLog


class SubmissionCheck(BaseCheck):
    name = "submission"
    phases: frozenset[Phase] = frozenset({"mail", "rcpt", "end_of_data"})

    def __init__(
        self,
        *,
        accounts: Callable[[str], Account | None],
        mode: SenderMode,
        delimiter: str,
        rate_limits: SubmissionRateLimits | None,
        submission: bool,
        maillog: MailLog,
    ) -> None:
        self.accounts = accounts
        self.mode = mode
        self.delimiter = delimiter
        self.rate_limits = rate_limits
        self.submission = submission
        self.maillog = maillog

    def _account(self, s: SessionContext) -> Account | None:
        """The authenticated user's account, looked up once per session."""
        if not s.client.authenticated:
            return None
        if self.name not in s.state:
            s.state[self.name] = self.accounts(s.client.username)
        known = s.state[self.name]
        return known if isinstance(known, Account) else None

    def _policed(self, account: Account | None) -> bool:
        # Every session of a submission listener; an authenticated client anywhere.
        return self.rate_limits is not None and (self.submission or account is not None)

    async def mail(self, s: SessionContext, tx: TransactionContext) -> Decision:
        account = self._account(s)
        saw: list[str] = []
        if account is not None:
            decision = check_mail_from(account, tx.sender, self.mode, self.delimiter)
            if decision.warning:
                self.maillog.event("warning", client=s.client.describe(), reason=decision.warning)
                saw.append(decision.warning)
            if not decision.allowed and decision.reply is not None:
                return reject(decision.reply, "; ".join(saw), metric="sender_policy")
            if not decision.warning:
                saw.append(f"<{tx.sender}> is owned by {account.username}")
        if self._policed(account):
            assert self.rate_limits is not None
            user = account.username if account is not None else None
            limited = self.rate_limits.check_message(user, s.client.ip)
            if limited is not None:
                return reject(
                    limited.reply, limited.log_reason, reason=limited.log_reason,
                    metric="rate_limit",
                )  # fmt: skip
            saw.append("message rate within limits")
        return proceed("; ".join(saw)) if saw else CONTINUE

    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Decision:
        account = self._account(s)
        if not self._policed(account):
            return CONTINUE
        assert self.rate_limits is not None
        user = account.username if account is not None else None
        limited = self.rate_limits.check_recipient(user, s.client.ip)
        if limited is not None:
            return reject(
                limited.reply, limited.log_reason, reason=limited.log_reason, metric="rate_limit"
            )
        return proceed("recipient rate within limits")

    async def end_of_data(
        self, s: SessionContext, tx: TransactionContext, message: MessageView
    ) -> Decision:
        account = self._account(s)
        if account is None:
            return CONTINUE
        decision = check_from_header(
            account, from_header_values(message.header), self.mode, self.delimiter
        )
        if decision.warning:
            self.maillog.event("warning", tx.queue_id, reason=decision.warning)
        if not decision.allowed and decision.reply is not None:
            return reject(decision.reply, decision.warning or "", metric="sender_policy")
        return proceed(decision.warning or f"From: owned by {account.username}")


def build(kind: ListenerKind, parts: PipelineParts) -> SubmissionCheck | None:
    # AUTH is offered on submission listeners only (build.py), so elsewhere no client
    # has an account and nothing is policed.
    if kind not in ("submission", "submissions"):
        return None
    config = parts.config
    return SubmissionCheck(
        accounts=parts.accounts,
        mode=config.submission.sender_policy,
        delimiter=config.aliases.recipient_delimiter,
        rate_limits=parts.rate_limits,
        submission=kind in ("submission", "submissions"),
        maillog=parts.maillog,
    )
