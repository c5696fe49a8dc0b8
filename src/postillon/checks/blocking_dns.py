"""Postillon's asyncio resolver, offered to blocking libraries (pyspf, dkimpy).

The verification libraries are synchronous and look names up themselves. We
run them in a worker thread and give them lookup functions built here, which
hand each lookup back to the event loop's :class:`Resolver` (so every query
goes to ``[dns] nameservers``, shares the TTL cache, and never the machine's
resolver) and wait for the answer. The event loop never blocks; only the
worker thread waits.

Temporary failures are remembered per name, so a check can tell "the key
does not exist" (permerror) from "DNS did not answer" (temperror) after a
library has folded both into ``False``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver

T = TypeVar("T")

# A worker thread never waits longer than this for one lookup, whatever the
# resolver's own timeouts say (they normally end the lookup much sooner).
LOOKUP_GUARD_SECONDS = 60.0


class BlockingDns:
    """Synchronous lookups for one message's checks, run from a worker thread."""

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop) -> None:
        self._resolver = resolver
        self._loop = loop
        self.temp_failures: dict[str, str] = {}  # name -> reason
        self.missing: set[str] = set()
        # TXT answers fetched on the loop before the worker starts (prefetch_txt):
        # the names a check is sure to ask save a thread round trip each.
        self._txt: dict[str, list[tuple[bytes, ...]]] = {}
        # The TTL of each answer served (name -> seconds, as received), so a result
        # computed from them (the SPF cache) lives no longer than they do.
        self.ttls: dict[str, int] = {}

    async def prefetch_txt(self, names: list[str]) -> None:
        """Look these TXT names up now, on the event loop, all at once."""

        async def one(name: str) -> None:
            key = name.lower().rstrip(".")
            try:
                answer = await self._resolver.txt(name)
            except DnsNotFound:
                self.missing.add(key)
                self._txt[key] = []
            except DnsTempError as exc:
                self.temp_failures[key] = exc.reason
            except Exception as exc:  # unexpected is temporary; the worker asks again
                self.temp_failures[key] = repr(exc)
            else:
                self._txt[key] = [r.strings for r in answer.records]
                self.ttls[key] = answer.ttl

        missing = []
        for name in dict.fromkeys(names):
            if not name:
                continue
            key = name.lower().rstrip(".")
            try:
                cached = self._resolver.cached_txt(name)
            except DnsNotFound:
                self.missing.add(key)
                self._txt[key] = []
                continue
            if cached is None:
                missing.append(name)
            else:
                self._txt[key] = [r.strings for r in cached.records]
                self.ttls[key] = cached.ttl
        if missing:  # only what the cache lacks costs a task each
            await asyncio.gather(*(one(n) for n in missing))

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(LOOKUP_GUARD_SECONDS)
        except TimeoutError:
            future.cancel()
            raise DnsTempError("?", "?", "lookup took too long") from None

    def _lookup(self, name: str, coro: Coroutine[Any, Any, T]) -> T | None:
        """The answer, None when the data does not exist; DnsTempError otherwise."""
        key = name.lower().rstrip(".")
        try:
            answer = self._wait(coro)
        except DnsNotFound:
            self.missing.add(key)
            return None
        except DnsTempError as exc:
            self.temp_failures[key] = exc.reason
            raise
        except Exception as exc:  # anything unexpected is temporary (resolver contract)
            self.temp_failures[key] = repr(exc)
            raise DnsTempError(name, "?", repr(exc)) from exc
        ttl = getattr(answer, "ttl", None)
        if isinstance(ttl, int):
            self.ttls[key] = min(ttl, self.ttls.get(key, ttl))
        return answer

    def prefetched_txt(self, name: str) -> list[tuple[bytes, ...]]:
        """What :meth:`prefetch_txt` got for ``name``, without a lookup, so safe on the
        event loop: the records ([] when there are none); DnsTempError when the lookup
        failed; KeyError when the name was not prefetched."""
        key = name.lower().rstrip(".")
        if key in self.temp_failures:
            raise DnsTempError(name, "TXT", self.temp_failures[key])
        return self._txt[key]

    def txt(self, name: str) -> list[tuple[bytes, ...]]:
        key = name.lower().rstrip(".")
        if key in self._txt:
            return self._txt[key]
        if key in self.temp_failures:
            raise DnsTempError(name, "TXT", self.temp_failures[key])
        answer = self._lookup(name, self._resolver.txt(name))
        return [r.strings for r in answer.records] if answer is not None else []

    def addresses(self, name: str) -> list[str]:
        answer = self._lookup(name, self._resolver.addresses(name))
        return list(answer.records) if answer is not None else []

    def mx(self, name: str) -> list[tuple[int, str]]:
        answer = self._lookup(name, self._resolver.mx(name))
        return [(r.preference, r.exchange) for r in answer.records] if answer else []

    def ptr(self, ip: str) -> list[str]:
        answer = self._lookup(ip, self._resolver.ptr(ip))
        return list(answer.records) if answer is not None else []

    def temp_failed(self, name: str) -> bool:
        return name.lower().rstrip(".") in self.temp_failures
