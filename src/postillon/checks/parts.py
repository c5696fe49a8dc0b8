"""What checks are built from: the shared objects the composition root makes.

``build.py`` makes one ``PipelineParts`` per (re)load and calls
``pipeline.build_pipeline(kind, parts)`` per listener kind. Each check's ``build``
takes what it needs from here and ignores the rest; a new check adds its field (its
config section, a client of its daemon) with a default, so nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postillon.config.model import Config
from postillon.core.account import Account
from postillon.core.clock import Clock
from postillon.observability.maillog import MailLog

if TYPE_CHECKING:
    from postillon.checks.authentication import InboundAuthentication
    from postillon.checks.rate_limit import SubmissionRateLimits
    from postillon.checks.relay import RelayPolicy
    from postillon.dns.resolver import Resolver
    from postillon.queue.store import QueueStore


@dataclass(frozen=True, slots=True)
class PipelineParts:
    config: Config
    clock: Clock
    maillog: MailLog
    relay: RelayPolicy
    # The account of an authenticated username (sender ownership), None if unknown.
    accounts: Callable[[str], Account | None] = lambda _name: None
    rate_limits: SubmissionRateLimits | None = None
    # SPF/DKIM/DMARC/ARC; None = [authentication] off.
    authentication: InboundAuthentication | None = None
    # postillon's resolver ([dns] nameservers), for DNSBL, reverse DNS, HELO checks.
    resolver: Resolver | None = None
    # The queue store, for checks whose state every node shares (greylist, rate limits).
    store: QueueStore | None = None
    # ``postillon explain --simulate``: decide as usual but change no shared state
    # (no greylist triplet recorded, no rate-limit count taken, no milter told to act).
    dry_run: bool = False
