"""What to do with a message given its authentication results (pure).

One function, :func:`decide`, maps (DMARC verdict and the policy it asks
for, the SPF result, allowlisting, ARC override) and the operator's
``[authentication]`` actions to one :class:`Decision`. The order:

1. allowlisted client or domain: accept (results are still recorded);
2. DMARC ``fail`` with ``p=reject`` / ``p=quarantine``: ``dmarc_reject`` /
   ``dmarc_quarantine`` (reject = ``550 5.7.1``);
3. DMARC ``temperror`` (the policy or an aligned identifier could not be
   looked up): ``451 4.7.1`` when ``temperror = "defer"``;
4. DMARC did not pass and SPF says ``fail``: ``spf_fail`` (reject =
   ``550 5.7.23``, RFC 7372); SPF ``temperror`` defers (``451 4.7.24``) only
   when an SPF fail would have been rejected;
5. otherwise accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from postillon.config.model import AuthAction, AuthenticationConfig
from postillon.core.reply import Reply

Action = Literal["accept", "quarantine", "reject", "defer"]


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str = ""
    reply: Reply | None = None  # for reject and defer


ACCEPT = Decision("accept")


def _act(action: AuthAction, reason: str, reject_reply: Reply) -> Decision:
    if action == "reject":
        return Decision("reject", reason, reject_reply)
    if action == "quarantine":
        return Decision("quarantine", reason)
    return Decision("accept", reason)


def decide(
    config: AuthenticationConfig,
    *,
    dmarc_result: str,
    dmarc_policy: str,
    from_domain: str,
    spf_result: str,
    spf_domain: str,
    allowlisted: bool = False,
) -> Decision:
    if allowlisted:
        return Decision("accept", "allowlisted")
    if dmarc_result == "fail" and dmarc_policy in ("reject", "quarantine"):
        reason = f"DMARC policy of {from_domain} is {dmarc_policy} and the message failed it"
        if dmarc_policy == "reject":
            reply = Reply.of(
                550, "5.7.1", f"Message rejected per DMARC policy of {from_domain} (RFC 7489)"
            )
            return _act(config.dmarc_reject, reason, reply)
        reply = Reply.of(
            550, "5.7.1", f"Message refused: DMARC check failed for {from_domain} (RFC 7489)"
        )
        return _act(config.dmarc_quarantine, reason, reply)
    if dmarc_result == "temperror" and config.temperror == "defer":
        return Decision(
            "defer",
            "DMARC could not be evaluated: DNS failure",
            Reply.of(451, "4.7.1", "Temporary DNS failure during DMARC check, try again later"),
        )
    if dmarc_result == "pass":
        return ACCEPT
    if spf_result == "fail":
        reply = Reply.of(
            550, "5.7.23", f"SPF check failed: {spf_domain} does not allow this host (RFC 7208)"
        )
        return _act(config.spf_fail, f"SPF fail for {spf_domain}", reply)
    if spf_result == "temperror" and config.spf_fail == "reject" and config.temperror == "defer":
        return Decision(
            "defer",
            f"SPF temperror for {spf_domain}",
            Reply.of(451, "4.7.24", "Temporary DNS failure during SPF check, try again later"),
        )
    return ACCEPT
