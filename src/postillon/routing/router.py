"""Recipient → route, at delivery time.

Recipients were already checked and aliases expanded at RCPT time (intake
stores final targets), so the router only decides *how* to deliver each
stored recipient: a local mailbox (Maildir) or a remote domain (outbound).
"""

from __future__ import annotations

from dataclasses import dataclass

from postillon.routing.local import LocalRecipients


@dataclass(frozen=True, slots=True)
class Route:
    """Where a recipient's mail goes. ``key`` groups deliveries that can share
    one transport session (same next hop)."""

    kind: str  # "maildir" | "smtp"
    key: str
    domain: str


class Router:
    def __init__(self, local: LocalRecipients) -> None:
        self.local = local

    def route(self, recipient: str) -> Route:
        domain = recipient.rpartition("@")[2].lower()
        if self.local.is_local_domain(domain):
            return Route("maildir", "maildir", domain)
        return Route("smtp", f"smtp:{domain}", domain)
