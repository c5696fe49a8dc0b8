"""Which MTA-STS policy a recipient domain has now: the cache, the TXT id, the fetch.

Design note
-----------
:meth:`StsPolicies.policy_for` runs before each MX delivery (RFC 8461 §5.1):

1. the cached policy: from memory, else from the queue store (``sts_policies``), re-read
   every ``STORE_RECHECK`` seconds so the nodes of a cluster and a restarted process
   share one cache (``queue/sts_cache.py``);
2. the ``_mta-sts.<domain>`` TXT id (postillon's resolver caches it for its TTL);
3. no valid TXT record (§3.1), or a DNS failure: the cached policy while it is unexpired,
   else none. A record that vanished must not switch off a policy before its ``max_age``
   (§10.2: it is what an attacker on the path would remove);
4. the id of the cached, unexpired policy: that policy;
5. otherwise (no policy cached, expired, or a new id) fetch now, at most one fetch per
   domain at a time, and not again within ``RETRY_AFTER`` of a failure (a stalling or
   broken host costs one timeout, not one per message). Fetched and valid: stored and
   used. Failed (unreachable, certificate, redirect, HTML, too big, malformed): the
   cached unexpired policy if any (§5.1, §3.3), else none - the documented fallback of
   §3.3 ("as though the domain has not implemented MTA-STS"), logged with the reason.

:meth:`refresh_due` is the background refresher (``start`` runs it every
``REFRESH_INTERVAL``): for every cached, unexpired policy it looks up the TXT id and
fetches again when the id changed or less than ``refresh_margin`` of its lifetime is left,
so a policy in use never expires for lack of a fetch. A failed refresh keeps the policy
and notes the error (``last_error``, shown by ``postillon queue sts``).

The clock, the resolver, the fetch and the store are injected; tests advance time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from postillon.core.sts import CachedPolicy, PolicyError, StsPolicy, parse_policy, record_id
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver
from postillon.dns.sts_fetch import (
    FETCH_ERROR,
    POLICY_INVALID,
    PolicyFetchError,
    fetch_policy,
)

__all__ = ["PolicyStore", "StsFailure", "StsPolicies"]

log = logging.getLogger("postillon.outbound.mta_sts")

STORE_RECHECK = 60.0  # seconds a policy read from the store serves from memory
RETRY_AFTER = 300.0  # seconds between fetch attempts after a failed one (per domain)
REFRESH_INTERVAL = 3600.0  # how often the background refresher looks at the cache
FETCH_TIMEOUT = 10.0  # the whole HTTPS exchange (§3.3: "a reasonable timeout")

Fetch = Callable[[str], Awaitable[str]]
# Why a domain that publishes MTA-STS has no policy to apply now: (RFC 8460 result type:
# sts-policy-fetch-error, sts-webpki-invalid or sts-policy-invalid; the reason logged).
StsFailure = tuple[str, str]


class PolicyStore(Protocol):
    """The queue store's MTA-STS cache (``queue/store.py`` step 6)."""

    async def sts_policy(self, domain: str) -> CachedPolicy | None: ...

    async def save_sts_policy(self, entry: CachedPolicy) -> None: ...

    async def sts_policies(self) -> list[CachedPolicy]: ...


def refresh_margin(max_age: int) -> float:
    """Refresh when less than this is left: half the lifetime, at most a day."""
    return min(max_age / 2, 86400.0)


class StsPolicies:
    def __init__(
        self,
        resolver: Resolver,
        store: PolicyStore | None,
        *,
        ca_file: str | None = None,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.time,
        fetch_timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self._resolver = resolver
        self._store = store
        self.ca_file = ca_file  # trust for the policy host and for the MX hosts (§4.2)
        self._fetch = fetch or self._https_fetch
        self._clock = clock
        self._fetch_timeout = fetch_timeout
        self._memory: dict[str, tuple[float, CachedPolicy | None]] = {}  # read at, entry
        self._failed: dict[str, float] = {}  # domain -> when a fetch last failed
        self._failures: dict[str, StsFailure] = {}  # domain -> why (until a fetch works)
        self._inflight: dict[str, asyncio.Task[CachedPolicy | None]] = {}
        self._refresher: asyncio.Task[None] | None = None

    async def _https_fetch(self, domain: str) -> str:
        return await fetch_policy(domain, self._resolver, self._fetch_timeout, ca_file=self.ca_file)

    # -- the policy for one delivery ------------------------------------------------
    async def policy_or_failure(self, domain: str) -> tuple[StsPolicy | None, StsFailure | None]:
        """:meth:`policy_for`, and when it is None for a domain whose TXT record says it
        has a policy, why (the failed fetch: RFC 8460 §4.3.2.2, for TLS reports)."""
        policy = await self.policy_for(domain)
        if policy is not None:
            return policy, None
        return None, self._failures.get(domain.lower().rstrip("."))

    async def policy_for(self, domain: str) -> StsPolicy | None:
        """The policy to apply to mail for ``domain`` now (None: no MTA-STS)."""
        domain = domain.lower().rstrip(".")
        now = self._clock()
        cached = await self._cached(domain, now)
        usable = cached if cached is not None and cached.fresh(now) else None
        ident = await self._txt_id(domain)
        if ident is None:
            self._failures.pop(domain, None)  # no policy published: nothing failed
            return usable.policy if usable is not None else None
        if usable is not None and usable.policy_id == ident:
            return usable.policy
        if now - self._failed.get(domain, -RETRY_AFTER) < RETRY_AFTER:
            return usable.policy if usable is not None else None
        fetched = await self._fetch_shared(domain, ident, cached)
        if fetched is not None:
            return fetched.policy
        return usable.policy if usable is not None else None

    async def _cached(self, domain: str, now: float) -> CachedPolicy | None:
        remembered = self._memory.get(domain)
        if remembered is not None and now - remembered[0] < STORE_RECHECK:
            return remembered[1]
        entry = remembered[1] if remembered is not None else None
        if self._store is not None:
            try:
                entry = await self._store.sts_policy(domain)
            except Exception as exc:  # a store problem must not stop delivery: keep memory
                log.warning("MTA-STS: reading the cached policy of %s failed: %s", domain, exc)
        self._memory[domain] = (now, entry)
        return entry

    async def _txt_id(self, domain: str) -> str | None:
        """The id of ``_mta-sts.<domain>``; None for none, an invalid one, or a DNS error."""
        try:
            answer = await self._resolver.txt(f"_mta-sts.{domain}")
        except DnsNotFound:
            return None
        except DnsTempError as exc:
            log.info("MTA-STS: TXT lookup of _mta-sts.%s failed: %s", domain, exc.reason)
            return None
        return record_id([r.joined.decode("utf-8", "replace") for r in answer.records])

    async def _fetch_shared(
        self, domain: str, ident: str, cached: CachedPolicy | None
    ) -> CachedPolicy | None:
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.ensure_future(self._fetch_and_store(domain, ident, cached))
            self._inflight[domain] = task
            task.add_done_callback(lambda _: self._inflight.pop(domain, None))
        # A delivery that gives up (cancelled) must not cancel the fetch others wait for.
        return await asyncio.shield(task)

    async def _fetch_and_store(
        self, domain: str, ident: str, cached: CachedPolicy | None
    ) -> CachedPolicy | None:
        """Fetch, parse, store; None (logged, noted on the cached entry) when that fails."""
        started = self._clock()
        try:
            policy = parse_policy(await self._fetch(domain))
        except PolicyFetchError as exc:
            reason, result_type = str(exc), exc.result_type
        except PolicyError as exc:
            reason, result_type = str(exc), POLICY_INVALID
        except Exception as exc:  # unforeseen: still only "no new policy", never a crash
            reason, result_type = f"{type(exc).__name__}: {exc}", FETCH_ERROR
        else:
            entry = CachedPolicy(domain, ident, policy, started, started)
            self._failed.pop(domain, None)
            self._failures.pop(domain, None)
            await self._save(entry)
            log.info(
                "MTA-STS: %s policy id %s: mode %s, mx %s, max_age %d",
                domain,
                ident,
                policy.mode,
                ", ".join(policy.mx) or "-",
                policy.max_age,
            )
            return entry
        self._failed[domain] = started
        self._failures[domain] = (result_type, reason)
        fallback = (
            "the cached policy stays"
            if cached is not None and cached.fresh(started)
            else ("no MTA-STS policy applies (RFC 8461 3.3)")
        )
        log.warning("MTA-STS: fetching the policy of %s failed: %s; %s", domain, reason, fallback)
        if cached is not None:
            await self._save(dataclasses.replace(cached, checked_at=started, last_error=reason))
        return None

    async def _save(self, entry: CachedPolicy) -> None:
        self._memory[entry.domain] = (self._clock(), entry)
        if self._store is None:
            return
        try:
            await self._store.save_sts_policy(entry)
        except Exception as exc:  # the policy still applies from memory
            log.warning("MTA-STS: storing the policy of %s failed: %s", entry.domain, exc)

    # -- the background refresher ---------------------------------------------------
    async def refresh_due(self) -> int:
        """One pass over the cache: refetch changed ids and policies near expiry.
        Returns how many fetches were made."""
        if self._store is None:
            entries = [e for _, e in self._memory.values() if e is not None]
        else:
            entries = await self._store.sts_policies()
        fetches = 0
        for entry in entries:
            now = self._clock()
            if not entry.fresh(now):
                continue  # expired: fetched again by the next delivery that needs it
            ident = await self._txt_id(entry.domain)
            changed = ident is not None and ident != entry.policy_id
            if changed or entry.expires_at - now < refresh_margin(entry.policy.max_age):
                fetches += 1
                await self._fetch_shared(entry.domain, ident or entry.policy_id, entry)
        return fetches

    def start(self, interval: float = REFRESH_INTERVAL) -> None:
        """Run :meth:`refresh_due` every ``interval`` seconds until :meth:`close`."""
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(interval))

    async def _refresh_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh_due()
            except Exception as exc:  # a bad pass must not end the refresher
                log.warning("MTA-STS: background refresh failed: %s", exc)

    async def close(self) -> None:
        tasks = [t for t in (self._refresher, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._refresher = None
