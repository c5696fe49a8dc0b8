"""SPF (RFC 7208) with pyspf, for the MAIL FROM and HELO identities.

pyspf looks names up through its module-level ``DNSLookup`` hook; we point
that hook at the :class:`BlockingDns` of the check running in the current
thread (a thread-local), so pyspf's queries go to postillon's resolver. The
check is blocking and runs in a worker thread (see ``authentication.py``).

Identities (RFC 7208 §2.3, §2.4): HELO is checked as ``postmaster@<helo>``
when the HELO name is a domain; MAIL FROM is the reverse-path, or
``postmaster@<helo>`` for the null sender (bounces).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spf

from postillon.checks.authresults import MethodResult
from postillon.checks.blocking_dns import BlockingDns
from postillon.dns.resolver import DnsTempError

# RFC 7208 §11.1: the whole evaluation should be bounded (20 s suggested).
SPF_TIMEOUT = 20

# SPF result cache (see SpfCache): at most this long, and never longer than the
# smallest TTL of the DNS answers the evaluation consulted.
SPF_CACHE_SECONDS = 60.0
SPF_CACHE_ENTRIES = 10_000

_current = threading.local()


class SpfCache:
    """Recent SPF results, keyed by (client IP, identity, HELO name).

    An SPF result is a pure function of those inputs and the DNS records the
    evaluation consulted (RFC 7208 §4), and a bulk sender's connections repeat
    the same inputs. An entry lives ``min(SPF_CACHE_SECONDS, smallest TTL of
    those records)``: the answer it stands for might be cached by our resolver
    about as long. Temporary errors are never stored. Thread-safe (worker threads).
    """

    def __init__(
        self,
        max_entries: int = SPF_CACHE_ENTRIES,
        max_age: float = SPF_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_entries
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple[str, str, str], tuple[float, tuple[str, str]]] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> tuple[str, str] | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if self._clock() >= item[0]:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[1]

    def put(self, key: tuple[str, str, str], value: tuple[str, str], ttl: float) -> None:
        lifetime = min(ttl, self._max_age)
        if lifetime <= 0 or self._max <= 0:
            return
        with self._lock:
            self._data[key] = (self._clock() + lifetime, value)
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def _dns_lookup(name: str, qtype: str, strict: object = True, timeout: object = 30) -> list[Any]:
    """pyspf's ``DNSLookup`` contract: a list of ((name, qtype), value) pairs."""
    bridge: BlockingDns | None = getattr(_current, "bridge", None)
    if bridge is None:
        raise spf.TempError("DNS: no resolver for this SPF check")
    key = (name, qtype)
    consulted: list[str] | None = getattr(_current, "consulted", None)
    if consulted is not None:
        consulted.append(name.lower().rstrip("."))
    try:
        if qtype in ("TXT", "SPF"):
            if qtype == "SPF":  # type 99 is obsolete (RFC 7208 §3.1): never published
                return []
            return [(key, strings) for strings in bridge.txt(name)]
        if qtype in ("A", "AAAA"):
            want_v6 = qtype == "AAAA"
            return [(key, a) for a in bridge.addresses(name) if (":" in a) == want_v6]
        if qtype == "MX":
            return [(key, mx) for mx in bridge.mx(name) if mx[1] != "."]
        if qtype == "PTR":
            ip = _ip_from_reverse_name(name)
            if consulted is not None and ip:
                consulted.append(ip.lower())  # the bridge knows a PTR answer by its IP
            return [(key, host) for host in bridge.ptr(ip)] if ip else []
    except DnsTempError as exc:
        raise spf.TempError(f"DNS {exc}") from None
    return []


def _ip_from_reverse_name(name: str) -> str:
    """pyspf asks PTR by in-addr.arpa / ip6.arpa name; our resolver wants the IP."""
    import dns.reversename

    try:
        return str(dns.reversename.to_address(dns.name.from_text(name)))
    except Exception:
        return ""


spf.DNSLookup = _dns_lookup


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    mailfrom: MethodResult
    helo: MethodResult | None
    domain: str  # the MAIL FROM identity's domain (for DMARC alignment)

    @property
    def result(self) -> str:
        return self.mailfrom.result


def _evaluate(
    bridge: BlockingDns, ip: str, sender: str, helo: str, cache: SpfCache | None = None
) -> tuple[str, str]:
    key = (ip, sender, helo)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    consulted: list[str] = []
    _current.bridge = bridge
    _current.consulted = consulted
    try:
        query = spf.query(i=ip, s=sender, h=helo, timeout=SPF_TIMEOUT, querytime=SPF_TIMEOUT)
        result, _code, explanation = query.check()
        outcome = str(result), str(explanation or "")
    except Exception as exc:  # pyspf raises for odd inputs: a temporary, logged verdict
        return "temperror", f"SPF evaluation failed: {exc}"
    finally:
        _current.bridge = None
        _current.consulted = None
    reliable = outcome[0] != "temperror" and not any(map(bridge.temp_failed, consulted))
    if cache is not None and reliable:
        # Answers without a TTL here (not found) count as the cache's own bound.
        ttls = [bridge.ttls[name] for name in consulted if name in bridge.ttls]
        cache.put(key, outcome, min(ttls, default=SPF_CACHE_SECONDS))
    return outcome


def _is_domain(name: str) -> bool:
    return "." in name and not name.startswith("[") and not name.replace(".", "").isdigit()


def check_spf(
    bridge: BlockingDns, ip: str, mail_from: str, helo: str, cache: SpfCache | None = None
) -> SpfOutcome:
    """Both identities, blocking (run in a worker thread); ``cache``: see SpfCache."""
    outcome = _check(ip, mail_from, helo, lambda s, h: _evaluate(bridge, ip, s, h, cache))
    assert outcome is not None  # _evaluate always answers
    return outcome


def cached_spf(cache: SpfCache, ip: str, mail_from: str, helo: str) -> SpfOutcome | None:
    """What :func:`check_spf` would say, when the cache holds every identity it needs;
    None otherwise. No lookup and no pyspf: cheap enough for the event loop, and a bulk
    sender's messages mostly end here."""
    return _check(ip, mail_from, helo, lambda s, h: cache.get((ip, s, h)))


def _check(
    ip: str, mail_from: str, helo: str, evaluate: Callable[[str, str], tuple[str, str] | None]
) -> SpfOutcome | None:
    helo = helo.strip().rstrip(".").lower()
    helo_result: MethodResult | None = None
    if _is_domain(helo):
        answer = evaluate(f"postmaster@{helo}", helo)
        if answer is None:
            return None
        result, why = answer
        helo_result = MethodResult("spf", result, why, (("smtp.helo", helo),))
    if mail_from:
        identity = mail_from
        domain = mail_from.rpartition("@")[2].lower()
        answer = evaluate(identity, helo or domain)
        if answer is None:
            return None
        result, why = answer
        mailfrom = MethodResult("spf", result, why, (("smtp.mailfrom", identity),))
    elif helo_result is not None:
        # RFC 7208 §2.4: for the null reverse-path the HELO result is the MAIL FROM result.
        domain = helo
        mailfrom = MethodResult(
            "spf",
            helo_result.result,
            helo_result.comment,
            (("smtp.mailfrom", f"postmaster@{helo}"),),
        )
        helo_result = None
    else:
        domain = ""
        mailfrom = MethodResult("spf", "none", "null sender and no usable HELO name")
    return SpfOutcome(mailfrom, helo_result, domain)
