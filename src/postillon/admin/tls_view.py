"""The admin page's TLS views: per destination domain, and per recipient.

Per destination (``GET /api/tls``, ``GET /api/tls/{domain}``): the outbound TLS
counters of the last days from the queue store (the RFC 8460 counters that
``[tls_reports]`` keeps: sessions per policy domain and result type, failures with
their MX host) joined with the MTA-STS policy cache (mode, MX patterns, expiry, the
last failed refresh). Both live in the store, so every node of a cluster shows the
same. Without ``[tls_reports] enabled`` nothing is counted (``counting`` is false)
and only the MTA-STS cache shows.

Per recipient (``queue_ops.last_tls_by_recipient``, shared with ``postillon queue
show``): the TLS of the last delivery attempt, from the message history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from postillon.admin.queue_ops import iso
from postillon.core.sts import CachedPolicy
from postillon.core.tlsrpt import SUCCESS, TlsResultCount, utc_day
from postillon.queue.store import QueueStore

__all__ = ["DEFAULT_DAYS", "MAX_DAYS", "tls_domains"]

DEFAULT_DAYS: Final = 2  # today and yesterday (UTC): a report day and the one in progress
MAX_DAYS: Final = 14
MAX_FAILURES: Final = 20  # failure rows shown per domain, most frequent first
DAY: Final = 86400.0


@dataclass
class _Domain:
    sessions: int = 0
    successful: int = 0
    results: dict[str, int] = field(default_factory=dict)
    policy_types: set[str] = field(default_factory=set)
    failures: dict[tuple[str, str, str, str], int] = field(default_factory=dict)

    def add(self, row: TlsResultCount) -> None:
        self.sessions += row.count
        if row.result == SUCCESS:
            self.successful += row.count
        self.results[row.result] = self.results.get(row.result, 0) + row.count
        self.policy_types.add(row.policy_type)
        if row.result != SUCCESS:
            key = (row.result, row.mx_host, row.receiving_ip, row.reason_code)
            self.failures[key] = self.failures.get(key, 0) + row.count


def _sts_json(entry: CachedPolicy, now: float) -> dict[str, Any]:
    return {
        "mode": entry.policy.mode,
        "mx": list(entry.policy.mx),
        "max_age": entry.policy.max_age,
        "policy_id": entry.policy_id,
        "fetched_at": iso(entry.fetched_at),
        "expires_at": iso(entry.expires_at),
        "checked_at": iso(entry.checked_at) if entry.checked_at else None,
        "fresh": entry.fresh(now),
        "last_error": entry.last_error or None,
    }


def _domain_json(
    name: str, counts: _Domain | None, sts: CachedPolicy | None, now: float
) -> dict[str, Any]:
    counts = counts or _Domain()
    failures = sorted(counts.failures.items(), key=lambda item: (-item[1], item[0]))
    return {
        "domain": name,
        "sessions": counts.sessions,
        "successful": counts.successful,
        "failed": counts.sessions - counts.successful,
        "policy_types": sorted(counts.policy_types),
        "results": dict(sorted(counts.results.items())),
        "failures": [
            {"result": r, "mx_host": mx, "receiving_ip": ip, "reason": reason, "count": n}
            for (r, mx, ip, reason), n in failures[:MAX_FAILURES]
        ],
        "mta_sts": _sts_json(sts, now) if sts is not None else None,
    }


async def tls_domains(
    store: QueueStore, now: float, days: int = DEFAULT_DAYS, domain: str | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """(the UTC days counted, newest first; one entry per destination domain), every
    domain with counters in those days or a cached MTA-STS policy, busiest first;
    only ``domain`` when given (an empty list when nothing is known of it)."""
    wanted = domain.lower().rstrip(".") if domain is not None else None
    day_names = [utc_day(now - i * DAY) for i in range(days)]
    counts: dict[str, _Domain] = {}
    for day in day_names:
        for row in await store.tls_reports.day(day, wanted):
            counts.setdefault(row.policy_domain.lower(), _Domain()).add(row)
    if wanted is not None:
        one = await store.sts_policy(wanted)
        policies = {wanted: one} if one is not None else {}
    else:
        policies = {p.domain.lower(): p for p in await store.sts_policies()}
    names = sorted(
        set(counts) | set(policies),
        key=lambda n: (-(counts[n].sessions if n in counts else 0), n),
    )
    return day_names, [_domain_json(n, counts.get(n), policies.get(n), now) for n in names]
