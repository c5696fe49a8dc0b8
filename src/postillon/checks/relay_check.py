"""The relay check at RCPT: ``relay.RelayPolicy`` behind the pipeline's interface.

A local recipient is routed to its final addresses (aliases expanded, a
``RouteRecipient`` change); a remote one is allowed from trusted networks and
authenticated clients only; everything else gets the policy's refusal. On every
listener kind (the only check LMTP has).
"""

from __future__ import annotations

from postillon.checks.base import BaseCheck
from postillon.checks.context import (
    ListenerKind,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import Decision, Phase, RouteRecipient, proceed, reject
from postillon.checks.parts import PipelineParts
from postillon.checks.relay import RelayPolicy
from postillon.core.address import parse_path
from postillon.core.recipient import RecipientAccepted
from postillon.observability.metrics import reject_reason_for_recipient


class RelayCheck(BaseCheck):
    name = "relay"
    phases: frozenset[Phase] = frozenset({"rcpt"})

    def __init__(self, policy: RelayPolicy) -> None:
        self.policy = policy

    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Decision:
        path = rcpt.path
        if path is None:  # a tool's recipient (explain --simulate), not a session's
            path = parse_path(f"<{rcpt.address}>", allow_postmaster=True, smtputf8=True)
            assert path is not None
        decision = self.policy.check_recipient(path, s.client.ip, s.client.authenticated)
        if isinstance(decision, RecipientAccepted):
            if path.domain and not self.policy.local.is_local_domain(path.domain):
                why = "authenticated" if s.client.authenticated else "trusted network"
                saw = f"<{rcpt.address}> is remote, relay allowed ({why})"
            elif decision.targets == (rcpt.address,):
                saw = f"<{rcpt.address}> is a local mailbox"
            else:
                saw = f"<{rcpt.address}> is local, delivered to " + ", ".join(decision.targets)
            return proceed(saw, RouteRecipient(decision.targets))
        saw = f"<{rcpt.address}>: {decision.detail or decision.reply.text}"
        return reject(decision.reply, saw, metric=reject_reason_for_recipient(decision.reply))


def build(kind: ListenerKind, parts: PipelineParts) -> RelayCheck:
    return RelayCheck(parts.relay)
